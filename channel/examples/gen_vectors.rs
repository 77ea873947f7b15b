//! Writes `channel/tests/vectors.json`: `cargo xtask vectors`.

#[path = "../tests/support/vectors.rs"]
#[allow(dead_code, unreachable_pub, missing_docs)]
mod vectors;

fn main() -> std::io::Result<()> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors.json");
    std::fs::write(&path, vectors::render())?;
    println!(
        "wrote {} vectors to {}",
        vectors::SHAPES.len(),
        path.display()
    );
    Ok(())
}
