//! The HTTP client against the real server: every call, its signature
//! checks, a refusal's stable code, a wrong tower key, a timeout and an
//! answer too large to read.

use std::sync::Arc;
use std::time::Duration;

use alloy_primitives::Address;
use perun_channel::{Allocation, Asset, Domain, Params, SignedState, State, U256};
use perun_wallet::{Account, LocalAccount};
use perun_watchtower::Error;
use perun_watchtower::api::{self, AppointmentStatus, Config, Tower};
use perun_watchtower::client::{Appointment, MAX_RESPONSE, TowerClient};
use perun_watchtower::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn start(dir: &tempfile::TempDir, key: &LocalAccount) -> String {
    let store = Store::open(dir.path().join("tower.redb")).expect("store");
    let account = LocalAccount::from_bytes(&key.secret_bytes()).expect("key");
    let tower = Arc::new(
        Tower::new(
            store,
            Arc::new(account),
            Config::default(),
            api::system_clock(),
        )
        .expect("tower"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(api::serve(listener, tower, std::future::pending()));
    format!("http://{addr}")
}

fn channel() -> (Params, SignedState) {
    let (alice, bob) = (LocalAccount::random(), LocalAccount::random());
    let domain = Domain {
        chain_id: U256::from(31337),
        adjudicator: Address::repeat_byte(0xad),
    };
    let balances = vec![vec![U256::from(10), U256::from(10)]];
    let params = Params::payment(
        domain,
        60,
        U256::from(7),
        vec![alice.address(), bob.address()],
        balances.clone(),
    );
    let asset = Asset {
        chainId: U256::from(31337),
        holder: Address::repeat_byte(0xaa),
    };
    let mut signed = SignedState::new(State::initial(
        &params,
        Allocation::new(vec![asset], balances),
    ));
    signed.sign(&params, 0, &alice).expect("sign");
    signed.sign(&params, 1, &bob).expect("sign");
    (params, signed)
}

#[tokio::test]
async fn every_call_with_checked_signatures() {
    let dir = tempfile::tempdir().expect("dir");
    let key = LocalAccount::random();
    let url = start(&dir, &key).await;
    let client = TowerClient::new(&url, key.address()).expect("client");
    let user = LocalAccount::random();

    let refused = client.get_subscription_info(&user).await;
    assert!(
        matches!(&refused, Err(Error::Refused { status: 404, code, .. }) if code == "unknown_user"),
        "{refused:?}"
    );
    let sub = client.register(&user).await.expect("register");
    assert_eq!(sub.slots_used, 0);
    assert_eq!(
        client.get_subscription_info(&user).await.expect("info"),
        sub
    );

    let (params, signed) = channel();
    let a = Appointment::new(&params, &signed, 1, &user).expect("appointment");
    let receipt = client.add_appointment(&a).await.expect("receipt");
    assert_eq!(receipt.tower, key.address());
    assert_eq!(receipt.locator, a.locator);
    receipt.verify().expect("verifies");
    assert_eq!(
        client
            .get_appointment(&user, a.locator)
            .await
            .expect("status"),
        AppointmentStatus::BeingWatched
    );
    // The same seq with another blob: the tower's stable code comes through.
    let again = Appointment::new(&params, &signed, 1, &user).expect("appointment");
    let stale = client.add_appointment(&again).await;
    assert!(
        matches!(&stale, Err(Error::Refused { status: 409, code, .. }) if code == "stale_appointment"),
        "{stale:?}"
    );

    // A client that expects another key refuses the tower's signatures.
    let wrong = TowerClient::new(&url, Address::repeat_byte(9)).expect("client");
    let b = Appointment::new(&params, &signed, 2, &user).expect("appointment");
    let r = wrong.add_appointment(&b).await;
    assert!(
        matches!(
            r,
            Err(Error::WrongTowerSignature {
                what: "receipt",
                ..
            })
        ),
        "{r:?}"
    );
}

#[tokio::test]
async fn silent_and_flooding_towers_are_bounded() {
    let user = LocalAccount::random();
    // Accepts, then never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let client = TowerClient::new(&format!("http://{silent_addr}"), Address::ZERO)
        .expect("client")
        .with_timeout(Duration::from_millis(300));
    let t = std::time::Instant::now();
    let r = client.register(&user).await;
    assert!(matches!(r, Err(Error::Timeout { .. })), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(3));

    // Answers with an endless body.
    let flood = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let flood_addr = flood.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = flood.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                    MAX_RESPONSE * 4
                );
                let _ = s.write_all(head.as_bytes()).await;
                let chunk = vec![b'x'; 8192];
                for _ in 0..(MAX_RESPONSE * 4 / 8192) {
                    if s.write_all(&chunk).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let client = TowerClient::new(&format!("http://{flood_addr}"), Address::ZERO)
        .expect("client")
        .with_timeout(Duration::from_secs(5));
    let r = client.register(&user).await;
    assert!(matches!(r, Err(Error::ResponseTooLarge { .. })), "{r:?}");

    // Nobody listens.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let closed_addr = closed.local_addr().expect("addr");
    drop(closed);
    let client = TowerClient::new(&format!("http://{closed_addr}"), Address::ZERO).expect("client");
    let r = client.register(&user).await;
    assert!(matches!(r, Err(Error::Io(_))), "{r:?}");
}
