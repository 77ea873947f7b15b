//! Bob in a child process of his own (this binary with [`CHILD_FLAG`]), as
//! a peer runs in deployment.
//!
//! Two clients in one process share more than a deployment's peers do: the
//! wallet's memo of checked signatures is process-wide, so each side would
//! find the other's signatures already checked (the signer remembered them)
//! and never recover one, while two processes recover each peer signature
//! once. The update figures (`--only durable,memory`) therefore run Bob
//! here, and the 100-channel run counts his CPU time with Alice's.
//!
//! The child builds Bob's client (a fresh funded account, accept-all
//! handlers, his store in the given directory), prints one
//! [`READY_PREFIX`] line with his peer id, address and listen addresses,
//! then one [`OPENED_PREFIX`] line per channel he accepted once it is
//! active, and shuts down when its standard input closes.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::Duration;

use perun::adjudicator::EthConfig;
use perun::adjudicator::testing::Anvil;
use perun::channel::{Address, ChannelId};
use perun::wire::{Multiaddr, PeerId};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::Res;
use crate::setup::{Chain, Store, client, deployment_args, parse_deployment};

/// The first argument that makes this binary Bob's process.
pub(crate) const CHILD_FLAG: &str = "--peer-child";
/// Prefix of the child's line saying who it is, once it listens.
const READY_PREFIX: &str = "PEER_READY ";
/// Prefix of the child's line for each channel it has open.
const OPENED_PREFIX: &str = "PEER_OPENED ";
/// Prefix of the child's line for a channel it failed to open.
const OPEN_FAILED_PREFIX: &str = "PEER_OPEN_FAILED ";
/// How long the child may take to start (build its client and listen).
const START_WAIT: Duration = Duration::from_secs(60);
/// How long the child may take to stop once its input closed.
const STOP_WAIT: Duration = Duration::from_secs(30);

/// A child process of this binary that prints a ready line, then lines
/// the parent waits for, and ends when its standard input closes.
pub(crate) struct Process {
    /// `None` once [`Process::shutdown`] took it.
    child: Option<Child>,
    /// Closing it tells the child to shut down.
    stdin: Option<ChildStdin>,
    /// The child's standard output, line by line.
    lines: mpsc::UnboundedReceiver<String>,
}

impl Process {
    /// Runs this binary with `args`; returns once it printed its
    /// [`READY_PREFIX`] line, with that line's JSON.
    pub(crate) async fn spawn(args: &[String]) -> Res<(Self, Value)> {
        let mut child = Command::new(std::env::current_exe()?)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().ok_or("the child has no stdout")?;
        let (tx, lines) = mpsc::unbounded_channel();
        // A plain thread: the pipe is blocking, and it ends with the child.
        std::thread::Builder::new()
            .name("bench-child-stdout".into())
            .spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            })?;
        let mut this = Self {
            child: Some(child),
            stdin,
            lines,
        };
        let ready = serde_json::from_str(&this.line(READY_PREFIX, START_WAIT).await?)?;
        Ok((this, ready))
    }

    /// The next line of the child's that starts with `prefix`, without it;
    /// an [`OPEN_FAILED_PREFIX`] line before it is the child's error.
    async fn line(&mut self, prefix: &str, wait: Duration) -> Res<String> {
        let found = tokio::time::timeout(wait, async {
            while let Some(line) = self.lines.recv().await {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Ok(rest.to_string());
                }
                if let Some(why) = line.strip_prefix(OPEN_FAILED_PREFIX) {
                    return Err(format!("the child failed to open a channel: {why}"));
                }
            }
            Err(format!("the child ended before a {prefix:?} line"))
        })
        .await
        .map_err(|_| format!("no {prefix:?} line from the child within {wait:?}"))?;
        Ok(found?)
    }

    /// User plus system CPU time of the child so far.
    pub(crate) fn cpu_time(&self) -> Res<Duration> {
        let child = self.child.as_ref().ok_or("the child was shut down")?;
        crate::stats::cpu_time_of(&PathBuf::from(format!("/proc/{}/stat", child.id())))
    }

    /// Closes the child's input, which shuts it down; kills it if it has
    /// not exited after [`STOP_WAIT`].
    pub(crate) async fn shutdown(mut self) -> Res<()> {
        drop(self.stdin.take());
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let status = tokio::task::spawn_blocking(move || wait_or_kill(&mut child, STOP_WAIT))
            .await??
            .ok_or("the child did not stop; killed")?;
        if !status.success() {
            return Err(format!("the child failed with {status}").into());
        }
        Ok(())
    }
}

/// Waits for `child` to exit; after `time_box` kills and reaps it
/// (`None`). The standard library has no wait with a timeout.
pub(crate) fn wait_or_kill(
    child: &mut Child,
    time_box: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let deadline = std::time::Instant::now() + time_box;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A child left behind by an error (no [`Process::shutdown`]) is killed
/// and reaped, so it neither loads the parts after it nor lingers.
impl Drop for Process {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The child's side of [`Process`]: prints the ready line, then waits until
/// standard input closes.
pub(crate) async fn serve_until_stdin_closes(ready: &Value) -> Res<()> {
    say(&format!("{READY_PREFIX}{ready}"))?;
    tokio::task::spawn_blocking(|| std::io::stdin().read_to_end(&mut Vec::new())).await??;
    Ok(())
}

/// Bob's running process.
pub(crate) struct Peer {
    process: Process,
    pub(crate) peer: PeerId,
    pub(crate) address: Address,
    pub(crate) addrs: Vec<Multiaddr>,
}

impl Peer {
    /// Starts Bob's process with his store (`durable`: `dir/bob.redb`) and
    /// waits until he listens.
    pub(crate) async fn spawn(chain: &Chain, store: Store, dir: &Path) -> Res<Self> {
        let mut args = vec![
            CHILD_FLAG.to_string(),
            match store {
                Store::Durable => "durable",
                Store::Memory => "memory",
            }
            .to_string(),
            dir.display().to_string(),
            chain.anvil.ws_url(),
        ];
        args.extend(deployment_args(&chain.deployment));
        let (process, ready) = Process::spawn(&args).await?;
        Ok(Self {
            peer: ready_field(&ready, "peer")?.parse()?,
            address: ready_field(&ready, "address")?.parse()?,
            addrs: parse_addrs(&ready)?,
            process,
        })
    }

    /// The id of the next channel Bob reports open.
    pub(crate) async fn opened(&mut self, wait: Duration) -> Res<ChannelId> {
        Ok(self.process.line(OPENED_PREFIX, wait).await?.parse()?)
    }

    /// User plus system CPU time of Bob's process so far.
    pub(crate) fn cpu_time(&self) -> Res<Duration> {
        self.process.cpu_time()
    }

    /// Shuts Bob down ([`Process::shutdown`]).
    pub(crate) async fn shutdown(self) -> Res<()> {
        self.process.shutdown().await
    }
}

/// Listen addresses as a ready line's `addrs` ([`parse_addrs`] reads them).
pub(crate) fn addr_strings(addrs: &[Multiaddr]) -> Vec<String> {
    addrs.iter().map(ToString::to_string).collect()
}

/// A string field of a child's ready line.
pub(crate) fn ready_field<'a>(ready: &'a Value, key: &str) -> Res<&'a str> {
    ready[key]
        .as_str()
        .ok_or_else(|| format!("the child's ready line lacks {key}").into())
}

/// The first of a ready line's `addrs`: where to dial the child.
pub(crate) fn first_addr(ready: &Value) -> Res<Multiaddr> {
    Ok(parse_addrs(ready)?
        .into_iter()
        .next()
        .ok_or("the child's ready line has no address")?)
}

/// The `addrs` of a ready line.
pub(crate) fn parse_addrs(ready: &Value) -> Res<Vec<Multiaddr>> {
    ready["addrs"]
        .as_array()
        .ok_or("the child's ready line lacks addrs")?
        .iter()
        .map(|a| Ok(a.as_str().ok_or("an address is not a string")?.parse()?))
        .collect()
}

/// The child: runs Bob until its standard input closes.
pub(crate) async fn child(args: &[String]) -> Res<()> {
    let [store, dir, url, deployment @ ..] = args else {
        return Err(
            "usage: --peer-child durable|memory DIR WS_URL ADJUDICATOR ETH_HOLDER TOKEN ERC20_HOLDER BLOCK"
                .into(),
        );
    };
    let store = match store.as_str() {
        "durable" => Store::Durable,
        "memory" => Store::Memory,
        other => return Err(format!("unknown store {other:?}").into()),
    };
    let config = EthConfig::from_deployment(&parse_deployment(deployment)?);
    let anvil = Anvil::attach(url).await?;
    let (bob, mut opened, _) = client(&anvil, &config, store, Path::new(dir), "bob").await?;
    let addrs = addr_strings(&bob.listen_addrs().await?);
    let ready = json!({
        "peer": bob.peer_id().to_string(),
        "address": bob.address().to_string(),
        "addrs": addrs,
    });
    let reporter = tokio::spawn(async move {
        while let Some(ch) = opened.recv().await {
            let line = match ch {
                Ok(ch) => format!("{OPENED_PREFIX}{}", ch.id()),
                Err(e) => format!("{OPEN_FAILED_PREFIX}{e}"),
            };
            if say(&line).is_err() {
                break;
            }
        }
    });
    // Standard input closes when the parent is done (or gone).
    let served = serve_until_stdin_closes(&ready).await;
    reporter.abort();
    bob.shutdown().await;
    served
}

/// One line to the parent, flushed at once.
fn say(line: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{line}")?;
    out.flush()
}
