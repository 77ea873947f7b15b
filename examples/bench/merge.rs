//! `--merge OUT RUN...`: several runs' `summary.json` files into one whose
//! figures are the medians, with each figure's range (`cargo xtask bench
//! --runs N` runs the benchmark N times, then this).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::Res;
use crate::report::{ROWS, print_table, target};

/// The median of `v` (the mean of the middle two for an even count).
fn median(v: &mut [f64]) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// Reads every run, writes `out` and prints the table of medians.
pub(crate) fn merge(out: &Path, runs: &[PathBuf]) -> Res<()> {
    if runs.is_empty() {
        return Err("--merge needs at least one run's summary".into());
    }
    let mut parsed = Vec::with_capacity(runs.len());
    for path in runs {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| format!("parsing {}: {e}", path.display()))?;
        parsed.push(v);
    }
    let mut keys: Vec<String> = Vec::new();
    for run in &parsed {
        if let Some(figures) = run["figures"].as_object() {
            for k in figures.keys() {
                if !keys.contains(k) {
                    keys.push(k.clone());
                }
            }
        }
    }
    let (mut figures, mut ranges, mut missing) = (Map::new(), Map::new(), Map::new());
    for key in &keys {
        let mut values: Vec<f64> = parsed
            .iter()
            .filter_map(|r| r["figures"][key.as_str()].as_f64())
            .collect();
        if values.is_empty() {
            // A part none of the runs ran.
            continue;
        }
        if values.len() < parsed.len() {
            // A figure some run could not measure: its median would
            // silently come from fewer runs.
            missing.insert(key.clone(), json!(parsed.len() - values.len()));
        }
        let med = median(&mut values);
        figures.insert(key.clone(), json!(med));
        if let (Some(lo), Some(hi)) = (values.first(), values.last()) {
            ranges.insert(key.clone(), json!([lo, hi]));
        }
    }
    let targets: Map<String, Value> = ROWS
        .iter()
        .filter_map(|k| {
            let (at_most, bound) = target(k)?;
            let v = figures.get(*k).and_then(Value::as_f64);
            let met = v.map(|v| if at_most { v <= bound } else { v >= bound });
            Some((
                (*k).to_string(),
                json!({ "at_most": at_most, "bound": bound, "met": met }),
            ))
        })
        .collect();
    let merged = json!({
        "figures": figures,
        "ranges": ranges,
        "targets": targets,
        "runs": runs.len(),
        "missing_in_runs": missing,
        "errors": parsed.iter().map(|r| r["errors"].clone()).collect::<Vec<_>>(),
        "counts": parsed[0]["counts"].clone(),
        "machine": parsed.iter().map(|r| r["machine"].clone()).collect::<Vec<_>>(),
    });
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(out, serde_json::to_string_pretty(&merged)?)?;
    println!("median of {} runs (range: lowest – highest)", runs.len());
    print_table(&figures, Some(&ranges));
    if !missing.is_empty() {
        println!("figures missing in some runs: {}", Value::Object(missing));
    }
    println!("\nwritten to {}", out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&mut []), None);
    }
}
