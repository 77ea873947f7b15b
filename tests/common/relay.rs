//! A TCP relay between two clients on 127.0.0.1 that a test can partition:
//! drop one direction's bytes, or cut every connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use perun::wire::Multiaddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Forwards every connection made to [`Relay::multiaddr`] to `target`.
pub struct Relay {
    addr: SocketAddr,
    /// Drop the bytes that flow from the target back to the dialer.
    drop_back: Arc<AtomicBool>,
    /// Bumped by [`Relay::cut`]: every open connection closes.
    cuts: watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let drop_back = Arc::new(AtomicBool::new(false));
        let (cuts, _) = watch::channel(0u64);
        let (drop2, cuts2) = (drop_back.clone(), cuts.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = TcpStream::connect(target).await else {
                    continue;
                };
                let mut cut = cuts2.subscribe();
                let drop_back = drop2.clone();
                tokio::spawn(async move {
                    let (mut ir, mut iw) = inbound.into_split();
                    let (mut or, mut ow) = outbound.into_split();
                    let forth = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = ir.read(&mut buf).await {
                            if n == 0 || ow.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    let back = async {
                        let mut buf = vec![0u8; 16 * 1024];
                        while let Ok(n) = or.read(&mut buf).await {
                            if n == 0 {
                                break;
                            }
                            if drop_back.load(Ordering::SeqCst) {
                                continue;
                            }
                            if iw.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        () = forth => {}
                        () = back => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Relay {
            addr,
            drop_back,
            cuts,
            task,
        }
    }

    /// Where dialers connect.
    pub fn multiaddr(&self) -> Multiaddr {
        format!("/ip4/127.0.0.1/tcp/{}", self.addr.port())
            .parse()
            .unwrap()
    }

    /// From now on, bytes from the target to the dialer are lost (the
    /// dialer's messages still arrive; nothing comes back).
    pub fn drop_back(&self, on: bool) {
        self.drop_back.store(on, Ordering::SeqCst);
    }

    /// Closes every open connection; new ones are forwarded again.
    pub fn cut(&self) {
        self.cuts.send_modify(|n| *n += 1);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}
