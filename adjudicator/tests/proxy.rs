//! `RpcProxy` in front of a real anvil: transparent by default, and each
//! fault as configured, over HTTP and websocket.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use alloy::network::{EthereumWallet, TransactionBuilder};
use alloy::providers::{DynProvider, Provider, ProviderBuilder, WsConnect};
use alloy::rpc::types::TransactionRequest;
use alloy::signers::local::PrivateKeySigner;
use alloy_primitives::{Address, U256};
use futures_util::{SinkExt, StreamExt};
use perun_adjudicator::testing::{
    Anvil, NotificationFault, ProxyFaults, ProxyStats, RequestFault, ResponseFault, RpcProxy,
};
use perun_wallet::Account;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A fresh anvil and a transparent proxy in front of it.
async fn setup() -> (Anvil, RpcProxy) {
    let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
    let proxy = RpcProxy::start(&anvil.ws_url()).await.unwrap();
    (anvil, proxy)
}

/// An alloy websocket provider through the proxy.
async fn provider(proxy: &RpcProxy) -> DynProvider {
    ProviderBuilder::new()
        .connect_ws(WsConnect::new(proxy.ws_url()))
        .await
        .unwrap()
        .erased()
}

fn request(id: u64, method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})
}

/// One HTTP POST on a fresh connection: `Some((status, body))`, or `None`
/// if the proxy closed the connection without a response.
async fn http_post(proxy: &RpcProxy, body: String) -> Option<(u16, Value)> {
    let addr = proxy.local_addr();
    tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let head = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(body.as_bytes()).unwrap();
        let mut raw = Vec::new();
        // A reset counts as closed, like an orderly close.
        let _ = s.read_to_end(&mut raw);
        if raw.is_empty() {
            return None;
        }
        let text = String::from_utf8(raw).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        let body = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap()
        };
        Some((status, body))
    })
    .await
    .unwrap()
}

async fn ws_connect(proxy: &RpcProxy) -> Ws {
    connect_async(proxy.ws_url()).await.unwrap().0
}

async fn ws_send(ws: &mut Ws, msg: &Value) {
    ws.send(Message::text(msg.to_string())).await.unwrap();
}

/// The next JSON message within `wait`: `Ok(None)` if none came, `Err` if the
/// connection closed.
async fn ws_next(ws: &mut Ws, wait: Duration) -> Result<Option<Value>, String> {
    loop {
        match tokio::time::timeout(wait, ws.next()).await {
            Err(_) => return Ok(None),
            Ok(None) => return Err("ended".into()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(Message::Text(t)))) => return Ok(Some(serde_json::from_str(&t).unwrap())),
            Ok(Some(Ok(Message::Close(c)))) => return Err(format!("close {c:?}")),
            Ok(Some(Ok(_))) => {}
        }
    }
}

async fn ws_call(ws: &mut Ws, msg: &Value) -> Value {
    ws_send(ws, msg).await;
    ws_next(ws, Duration::from_secs(20))
        .await
        .unwrap()
        .expect("no answer")
}

/// A wallet provider for a fresh funded account, through the proxy.
async fn wallet(anvil: &Anvil, proxy: &RpcProxy) -> (DynProvider, Address) {
    let account = anvil.funded_account().await.unwrap();
    let signer = PrivateKeySigner::from_slice(&account.secret_bytes()).unwrap();
    // A nonce read per transaction, as the backend does: a refused send
    // must not leave a gap.
    let p = ProviderBuilder::new()
        .disable_recommended_fillers()
        .with_gas_estimation()
        .with_simple_nonce_management()
        .fetch_chain_id()
        .wallet(EthereumWallet::from(signer))
        .connect_ws(WsConnect::new(proxy.ws_url()))
        .await
        .unwrap()
        .erased();
    (p, account.address())
}

fn transfer(to: Address, wei: u64) -> TransactionRequest {
    TransactionRequest::default()
        .with_to(to)
        .with_value(U256::from(wei))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparent_over_ws_and_http() {
    let (anvil, proxy) = setup().await;
    assert!(proxy.ws_url().starts_with("ws://127.0.0.1:"));
    assert_eq!(proxy.http_url().replace("http", "ws"), proxy.ws_url());
    let p = provider(&proxy).await;
    assert_eq!(p.get_chain_id().await.unwrap(), 31337);
    anvil.mine(3).await.unwrap();
    assert_eq!(
        p.get_block_number().await.unwrap(),
        anvil.block_number().await.unwrap()
    );
    // A transaction through the proxy, and its receipt.
    let (w, _) = wallet(&anvil, &proxy).await;
    let to = Address::repeat_byte(0x42);
    let receipt = w
        .send_transaction(transfer(to, 1_000))
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert!(receipt.status());
    assert_eq!(anvil.eth_balance(to).await.unwrap(), U256::from(1_000));
    // HTTP: a single request and a batch.
    let (status, body) = http_post(&proxy, request(7, "eth_chainId", json!([])).to_string())
        .await
        .unwrap();
    assert_eq!(
        (status, &body["id"], &body["result"]),
        (200, &json!(7), &json!("0x7a69"))
    );
    let batch = json!([
        request(1, "eth_chainId", json!([])),
        request(2, "eth_getBalance", json!([to, "latest"])),
    ]);
    let (status, body) = http_post(&proxy, batch.to_string()).await.unwrap();
    assert_eq!(status, 200);
    let answers = body.as_array().unwrap();
    assert_eq!(answers.len(), 2);
    let balance = answers.iter().find(|a| a["id"] == 2).unwrap();
    assert_eq!(balance["result"], json!("0x3e8"));
    // The harness's admin calls work through the proxy too.
    let via = Anvil::attach(&proxy.ws_url()).await.unwrap();
    assert_eq!(via.http_url(), proxy.http_url());
    let height = anvil.block_number().await.unwrap();
    via.increase_time(60).await.unwrap();
    assert_eq!(via.block_number().await.unwrap(), height + 1);
    drop(via);
    let stats = proxy.stats();
    assert_eq!(stats.faults_injected(), 0, "{stats:?}");
    assert!(stats.requests >= 6 && stats.responses >= 6, "{stats:?}");
    assert_eq!(stats.garbage, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_reach_the_caller() {
    let (_anvil, proxy) = setup().await;
    let p = provider(&proxy).await;
    proxy.set_faults(ProxyFaults {
        error: 1.0,
        ..ProxyFaults::none(1)
    });
    for _ in 0..4 {
        let err = p.get_block_number().await.unwrap_err();
        let resp = err.as_error_resp().expect("a JSON-RPC error response");
        assert!([-32005, -32603].contains(&resp.code), "{resp:?}");
    }
    // Over HTTP, with the request's id; a batch gets one error per request.
    let (status, body) = http_post(&proxy, request(9, "eth_chainId", json!([])).to_string())
        .await
        .unwrap();
    assert_eq!((status, &body["id"]), (200, &json!(9)));
    assert!([-32005, -32603].contains(&body["error"]["code"].as_i64().unwrap()));
    let batch = json!([
        request(1, "eth_chainId", json!([])),
        request(2, "eth_chainId", json!([]))
    ]);
    let (_, body) = http_post(&proxy, batch.to_string()).await.unwrap();
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert!(
        body.as_array()
            .unwrap()
            .iter()
            .all(|a| a["error"]["code"].is_i64())
    );
    let stats = proxy.stats();
    assert_eq!((stats.errors, stats.requests), (6, 0), "{stats:?}");
    // Off again: transparent.
    proxy.set_faults(ProxyFaults::none(1));
    p.get_block_number().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_requests_time_out() {
    let (anvil, proxy) = setup().await;
    let p = provider(&proxy).await;
    proxy.set_faults(ProxyFaults {
        drop: 1.0,
        ..ProxyFaults::none(2)
    });
    let call = tokio::time::timeout(Duration::from_millis(500), p.get_block_number()).await;
    assert!(call.is_err(), "answered: {call:?}");
    // HTTP: the connection closes without a response.
    let answer = http_post(&proxy, request(1, "eth_chainId", json!([])).to_string()).await;
    assert_eq!(answer, None);
    assert_eq!(proxy.stats().dropped, 2);
    // A lost response: the call took effect, its answer never came.
    proxy.set_faults(ProxyFaults {
        response_drop: 1.0,
        ..ProxyFaults::none(2)
    });
    let before = anvil.block_number().await.unwrap();
    let mut ws = ws_connect(&proxy).await;
    ws_send(&mut ws, &request(1, "evm_mine", json!([]))).await;
    assert_eq!(ws_next(&mut ws, Duration::from_millis(500)).await, Ok(None));
    assert_eq!(anvil.block_number().await.unwrap(), before + 1);
    let answer = http_post(&proxy, request(2, "evm_mine", json!([])).to_string()).await;
    assert_eq!(answer, None);
    assert_eq!(anvil.block_number().await.unwrap(), before + 2);
    let stats = proxy.stats();
    assert_eq!(
        (stats.responses_dropped, stats.requests),
        (2, 2),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delays_hold_requests_and_responses() {
    let (_anvil, proxy) = setup().await;
    let faults = ProxyFaults {
        delay: 1.0,
        max_delay: Duration::from_millis(300),
        ..ProxyFaults::none(3)
    };
    proxy.set_faults(faults);
    let mut ws = ws_connect(&proxy).await;
    let start = Instant::now();
    let answer = ws_call(&mut ws, &request(5, "eth_chainId", json!([]))).await;
    assert_eq!(answer["id"], 5);
    let RequestFault::Delay(a) = faults.request_plan(0) else {
        panic!("{:?}", faults.request_plan(0))
    };
    let ResponseFault::Delay(b) = faults.response_plan(0) else {
        panic!("{:?}", faults.response_plan(0))
    };
    assert!(
        start.elapsed() >= a + b,
        "{:?} < {a:?} + {b:?}",
        start.elapsed()
    );
    let (status, _) = http_post(&proxy, request(6, "eth_chainId", json!([])).to_string())
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(proxy.stats().delayed, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnects_close_websockets_and_alloy_reconnects() {
    let (anvil, proxy) = setup().await;
    let p = provider(&proxy).await;
    p.get_block_number().await.unwrap();
    let mut raw = ws_connect(&proxy).await;
    ws_call(&mut raw, &request(1, "eth_chainId", json!([]))).await;
    let sessions = proxy.stats().websockets;
    assert_eq!(sessions, 2);
    proxy.disconnect_all();
    assert!(ws_next(&mut raw, Duration::from_secs(5)).await.is_err());
    // alloy's pubsub reconnects through the proxy, and calls work again.
    anvil.mine(1).await.unwrap();
    let height = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            if let Ok(n) = p.get_block_number().await {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!(height, anvil.block_number().await.unwrap());
    assert!(proxy.stats().websockets > sessions, "{:?}", proxy.stats());
    // An injected disconnect closes the connection instead of answering.
    proxy.set_faults(ProxyFaults {
        disconnect: 1.0,
        ..ProxyFaults::none(4)
    });
    let mut raw = ws_connect(&proxy).await;
    ws_send(&mut raw, &request(2, "eth_chainId", json!([]))).await;
    assert!(ws_next(&mut raw, Duration::from_secs(5)).await.is_err());
    assert_eq!(
        http_post(&proxy, request(3, "eth_chainId", json!([])).to_string()).await,
        None
    );
    assert!(proxy.stats().disconnects >= 2);
    proxy.set_faults(ProxyFaults::none(4));
    let mut raw = ws_connect(&proxy).await;
    ws_call(&mut raw, &request(4, "eth_chainId", json!([]))).await;
}

/// Subscribes to new heads over a raw websocket and mines `blocks`; returns
/// the block numbers of the notifications that arrive. Counted, not timed:
/// it waits until the proxy has forwarded or dropped a notification of
/// each block, reads the ones forwarded, and unsubscribes before closing,
/// so no later round's heads reach this session (on a loaded machine a
/// pause for silence, and one for the session to end, were not enough).
async fn heads(anvil: &Anvil, proxy: &RpcProxy, blocks: u64) -> Vec<u64> {
    let handled = |s: ProxyStats| {
        (s.notifications + s.notifications_dropped).saturating_sub(s.notifications_duplicated)
    };
    let before = proxy.stats();
    let mut ws = ws_connect(proxy).await;
    let sub = ws_call(&mut ws, &request(1, "eth_subscribe", json!(["newHeads"]))).await;
    let id = sub["result"]
        .as_str()
        .unwrap_or_else(|| panic!("{sub}"))
        .to_owned();
    anvil.mine(blocks).await.unwrap();
    let after = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let now = proxy.stats();
            if handled(now) >= handled(before) + blocks {
                return now;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the proxy handles a notification of every block");
    let mut got = Vec::new();
    for _ in before.notifications..after.notifications {
        let n = ws_next(&mut ws, Duration::from_secs(20))
            .await
            .unwrap()
            .expect("a forwarded notification");
        assert_eq!(n["method"], "eth_subscription", "{n}");
        let hex = n["params"]["result"]["number"].as_str().unwrap();
        got.push(u64::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap());
    }
    let unsub = ws_call(&mut ws, &request(2, "eth_unsubscribe", json!([id]))).await;
    assert_eq!(unsub["result"], true, "{unsub}");
    let _ = ws.close(None).await;
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notifications_dropped_duplicated_delayed() {
    let (anvil, proxy) = setup().await;
    let start = anvil.block_number().await.unwrap();
    assert_eq!(heads(&anvil, &proxy, 2).await, [start + 1, start + 2]);
    proxy.set_faults(ProxyFaults {
        notification_drop: 1.0,
        ..ProxyFaults::none(5)
    });
    assert_eq!(heads(&anvil, &proxy, 3).await, Vec::<u64>::new());
    assert_eq!(proxy.stats().notifications_dropped, 3);
    proxy.set_faults(ProxyFaults {
        notification_duplicate: 1.0,
        ..ProxyFaults::none(5)
    });
    let n = start + 5;
    assert_eq!(heads(&anvil, &proxy, 2).await, [n + 1, n + 1, n + 2, n + 2]);
    proxy.set_faults(ProxyFaults {
        notification_delay: 1.0,
        max_delay: Duration::from_millis(300),
        ..ProxyFaults::none(5)
    });
    // Delayed, but in order.
    let n = start + 7;
    assert_eq!(heads(&anvil, &proxy, 3).await, [n + 1, n + 2, n + 3]);
    let stats = proxy.stats();
    assert_eq!(
        (stats.notifications_duplicated, stats.notifications_delayed),
        (2, 3),
        "{stats:?}"
    );
    // Half of them lost: exactly the ones the plan says.
    let faults = ProxyFaults {
        notification_drop: 0.5,
        ..ProxyFaults::none(6)
    };
    proxy.set_faults(faults);
    let first = stats.notifications + stats.notifications_dropped - stats.notifications_duplicated;
    let n = start + 10;
    let expected: Vec<u64> = (0..8)
        .filter(|k| faults.notification_plan(first + k) == NotificationFault::Forward)
        .map(|k| n + 1 + k)
        .collect();
    assert!(!expected.is_empty() && expected.len() < 8, "{expected:?}");
    assert_eq!(heads(&anvil, &proxy, 8).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn same_seed_same_decisions() {
    let faults = |seed| ProxyFaults {
        drop: 0.15,
        error: 0.2,
        delay: 0.2,
        response_drop: 0.1,
        disconnect: 0.1,
        max_delay: Duration::from_millis(20),
        ..ProxyFaults::none(seed)
    };
    assert_eq!(
        (0..500)
            .map(|n| faults(7).request_plan(n))
            .collect::<Vec<_>>(),
        (0..500)
            .map(|n| faults(7).request_plan(n))
            .collect::<Vec<_>>()
    );
    assert_ne!(
        (0..500)
            .map(|n| faults(7).request_plan(n))
            .collect::<Vec<_>>(),
        (0..500)
            .map(|n| faults(8).request_plan(n))
            .collect::<Vec<_>>()
    );
    // Sequential traffic through two proxies with one seed meets the same faults.
    let anvil = Anvil::spawn().await.unwrap();
    let mut runs = Vec::new();
    for seed in [7, 7, 8] {
        let proxy = RpcProxy::start(&anvil.ws_url()).await.unwrap();
        proxy.set_faults(faults(seed));
        let mut outcomes = Vec::new();
        for id in 0..30 {
            let answer = http_post(&proxy, request(id, "eth_chainId", json!([])).to_string()).await;
            outcomes.push(match answer {
                None => "closed".to_owned(),
                Some((_, body)) if body["error"].is_object() => {
                    format!("error {}", body["error"]["code"])
                }
                Some((_, body)) => format!("ok {}", body["result"]),
            });
        }
        runs.push((outcomes, proxy.stats()));
    }
    assert_eq!(runs[0], runs[1]);
    assert_ne!(runs[0].0, runs[2].0);
    assert!(runs[0].0.iter().any(|o| o == "closed"));
    assert!(runs[0].0.iter().any(|o| o.starts_with("error")));
    assert!(runs[0].0.iter().any(|o| o.starts_with("ok")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_holds_and_block_method_refuses() {
    let (anvil, proxy) = setup().await;
    let p = provider(&proxy).await;
    p.get_block_number().await.unwrap();
    proxy.stall(true);
    let pending = tokio::spawn({
        let p = p.clone();
        async move { p.get_block_number().await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!pending.is_finished());
    proxy.stall(false);
    let n = tokio::time::timeout(Duration::from_secs(10), pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(n, anvil.block_number().await.unwrap());
    // Transactions are refused while their method is blocked; reads go on.
    let (w, _) = wallet(&anvil, &proxy).await;
    proxy.block_method("eth_sendRawTransaction", true);
    let to = Address::repeat_byte(0x43);
    let err = w.send_transaction(transfer(to, 5)).await.unwrap_err();
    assert_eq!(err.as_error_resp().unwrap().code, -32603, "{err}");
    w.get_block_number().await.unwrap();
    assert_eq!(anvil.pending_transactions().await.unwrap(), 0);
    assert_eq!(anvil.eth_balance(to).await.unwrap(), U256::ZERO);
    proxy.block_method("eth_sendRawTransaction", false);
    w.send_transaction(transfer(to, 5))
        .await
        .unwrap()
        .get_receipt()
        .await
        .unwrap();
    assert_eq!(anvil.eth_balance(to).await.unwrap(), U256::from(5));
    assert_eq!(proxy.stats().blocked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_garbage_closes_only_that_connection() {
    let (_anvil, proxy) = setup().await;
    let mut good = ws_connect(&proxy).await;
    for bad in [
        Message::text("not json"),
        Message::text("[]"),
        Message::text(r#"{"id":1}"#),
        Message::binary(vec![1u8, 2, 3]),
    ] {
        let mut ws = ws_connect(&proxy).await;
        ws.send(bad).await.unwrap();
        assert!(ws_next(&mut ws, Duration::from_secs(5)).await.is_err());
    }
    assert_eq!(http_post(&proxy, "{\"no".to_owned()).await, None);
    // Bytes that are not HTTP at all: hyper answers 400 and closes.
    let addr = proxy.local_addr();
    let answer = tokio::task::spawn_blocking(move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(b"\x00\x01 garbage\r\n\r\n").unwrap();
        let mut raw = Vec::new();
        let _ = s.read_to_end(&mut raw);
        String::from_utf8_lossy(&raw).into_owned()
    })
    .await
    .unwrap();
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while proxy.stats().garbage < 6 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(proxy.stats().garbage, 6);
    // Everyone else is served as before.
    let answer = ws_call(&mut good, &request(1, "eth_chainId", json!([]))).await;
    assert_eq!(answer["result"], "0x7a69");
}

/// A fake node that answers every websocket message, and every HTTP
/// request, with bytes that are not JSON.
async fn garbage_node() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut peek = [0u8; 4096];
                let n = stream.peek(&mut peek).await.unwrap_or(0);
                let head = String::from_utf8_lossy(&peek[..n]).to_lowercase();
                if head.contains("upgrade: websocket") {
                    let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                    while let Some(Ok(_)) = ws.next().await {
                        let _ = ws.send(Message::text("}{ garbage")).await;
                    }
                } else {
                    let mut s = stream.into_std().unwrap();
                    s.set_nonblocking(false).unwrap();
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ngarbage");
                }
            });
        }
    });
    format!("ws://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_garbage_closes_the_client_connection() {
    let proxy = RpcProxy::start(&garbage_node().await).await.unwrap();
    let mut ws = ws_connect(&proxy).await;
    ws_send(&mut ws, &request(1, "eth_chainId", json!([]))).await;
    assert!(ws_next(&mut ws, Duration::from_secs(5)).await.is_err());
    assert_eq!(
        http_post(&proxy, request(2, "eth_chainId", json!([])).to_string()).await,
        None
    );
    assert_eq!(proxy.stats().garbage, 2);
    // The proxy still accepts connections.
    ws_connect(&proxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_clients_at_once() {
    let (anvil, proxy) = setup().await;
    let height = anvil.block_number().await.unwrap();
    let clients = (0..16).map(|_| {
        let url = proxy.ws_url();
        tokio::spawn(async move {
            let p = ProviderBuilder::new()
                .connect_ws(WsConnect::new(url))
                .await
                .unwrap();
            for _ in 0..5 {
                assert_eq!(p.get_block_number().await.unwrap(), height);
            }
        })
    });
    for c in clients.collect::<Vec<_>>() {
        c.await.unwrap();
    }
    let https =
        (0..8).map(|i| http_post(&proxy, request(i, "eth_blockNumber", json!([])).to_string()));
    for answer in futures_util::future::join_all(https).await {
        assert_eq!(answer.unwrap().0, 200);
    }
    let stats = proxy.stats();
    assert_eq!(stats.websockets, 16);
    assert!(stats.requests >= 88, "{stats:?}");
}

#[tokio::test]
async fn bad_upstream_urls_are_refused() {
    for bad in ["http://127.0.0.1:1", "wss://127.0.0.1:1", "nonsense"] {
        let err = RpcProxy::start(bad).await.unwrap_err();
        assert!(err.to_string().contains("ws://host:port"), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_proxy_closes_everything() {
    let (anvil, proxy) = setup().await;
    let mut ws = ws_connect(&proxy).await;
    ws_call(&mut ws, &request(1, "eth_chainId", json!([]))).await;
    let addr = proxy.local_addr();
    drop(proxy);
    assert!(ws_next(&mut ws, Duration::from_secs(5)).await.is_err());
    // The listener goes with the accept task, which is aborted.
    let refused = tokio::time::timeout(Duration::from_secs(5), async {
        while TcpStream::connect(addr).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    refused.await.unwrap();
    // The node behind it is untouched.
    anvil.mine(1).await.unwrap();
}

/// The Ethereum backend through the proxy: transparent, it works as on the
/// node itself; with injected errors its calls fail transiently and a retry
/// loop gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eth_backend_through_the_proxy() {
    use perun_adjudicator::{
        Adjudicator, AdjudicatorEvent, EthAdjudicator, EthConfig, SignedChannel, deploy,
    };
    use perun_channel::{Allocation, Asset, Params, SignedState, State};
    use perun_wallet::LocalAccount;

    let (anvil, proxy) = setup().await;
    let deployer = anvil.funded_account().await.unwrap();
    let d = deploy(&anvil.provider(&deployer).await.unwrap())
        .await
        .unwrap();
    let adj = EthAdjudicator::connect(&proxy.ws_url(), &deployer, EthConfig::from_deployment(&d))
        .await
        .unwrap();
    let parties = [LocalAccount::random(), LocalAccount::random()];
    let params = Params::payment(
        adj.domain(),
        600,
        U256::from(rand::random::<u64>()),
        parties.iter().map(|p| p.address()).collect(),
        vec![vec![U256::ZERO, U256::ZERO]],
    );
    let asset = Asset {
        chainId: U256::from(31337),
        holder: d.eth_holder,
    };
    let initial = State::initial(
        &params,
        Allocation::new(vec![asset], vec![vec![U256::ZERO, U256::ZERO]]),
    );
    let signed = |version: u64| {
        let mut state = initial.clone();
        state.version = version;
        let mut s = SignedState::new(state);
        for (i, p) in parties.iter().enumerate() {
            s.sign(&params, i, p).unwrap();
        }
        SignedChannel {
            params: params.clone(),
            state: s,
        }
    };
    let id = initial.channelId;
    let mut events = adj.subscribe(id).await.unwrap();
    let first = tokio::time::timeout(Duration::from_secs(20), events.next()).await;
    assert!(matches!(
        first.unwrap().unwrap().unwrap(),
        AdjudicatorEvent::CaughtUp { .. }
    ));
    adj.register(&signed(1)).await.unwrap();
    assert_eq!(adj.dispute(id).await.unwrap().unwrap().version, 1);
    let next = tokio::time::timeout(Duration::from_secs(20), events.next()).await;
    assert!(matches!(
        next.unwrap().unwrap().unwrap(),
        AdjudicatorEvent::Registered { version: 1, .. }
    ));
    // A third of the requests fail: every failure is transient, retries win.
    proxy.set_faults(ProxyFaults {
        error: 0.3,
        ..ProxyFaults::none(9)
    });
    let mut failures = 0;
    let registered = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match adj.register(&signed(2)).await {
                Ok(()) => return,
                Err(e) => {
                    assert!(e.is_transient(), "{e}");
                    failures += 1;
                }
            }
        }
    });
    registered.await.unwrap();
    proxy.set_faults(ProxyFaults::none(9));
    assert_eq!(adj.dispute(id).await.unwrap().unwrap().version, 2);
    assert!(
        proxy.stats().errors > 0,
        "{:?} ({failures} failures)",
        proxy.stats()
    );
}
