//! The anvil harness: fails loudly without anvil, moves time, dies with its handle.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use alloy::providers::{Provider, ProviderBuilder, WsConnect};
use perun_adjudicator::testing::Anvil;

#[tokio::test]
async fn missing_anvil_says_run_setup() {
    let err = Anvil::spawn_at(PathBuf::from("/nonexistent/anvil"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("run cargo xtask setup"), "{err}");
}

#[tokio::test]
async fn increase_time_moves_the_clock_and_drop_kills_anvil() {
    let anvil = Anvil::spawn().await.unwrap();
    let url = anvil.ws_url();
    assert!(url.starts_with("ws://127.0.0.1:"));
    let before = anvil.now().await.unwrap();
    anvil.increase_time(1_000).await.unwrap();
    let after = anvil.now().await.unwrap();
    assert!(after >= before + 1_000, "{before} -> {after}");
    let who = anvil.funded_account().await.unwrap();
    let who = perun_wallet::Account::address(&who);
    let bal = anvil.admin().get_balance(who).await.unwrap();
    assert!(!bal.is_zero());
    assert_eq!(anvil.eth_balance(who).await.unwrap(), bal);
    drop(anvil);
    assert!(
        ProviderBuilder::new()
            .connect_ws(WsConnect::new(url))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn attach_drives_a_running_node_and_leaves_it_running() {
    let anvil = Anvil::spawn().await.unwrap();
    let attached = Anvil::attach(&anvil.ws_url()).await.unwrap();
    assert_eq!(attached.ws_url(), anvil.ws_url());
    assert_eq!(
        attached.http_url(),
        anvil.ws_url().replace("ws://", "http://")
    );
    let before = anvil.now().await.unwrap();
    attached.increase_time(500).await.unwrap();
    attached.mine(2).await.unwrap();
    assert!(anvil.now().await.unwrap() >= before + 500);
    let height = attached.block_number().await.unwrap();
    assert_eq!(anvil.block_number().await.unwrap(), height);
    let who = attached.funded_account().await.unwrap();
    assert!(
        !anvil
            .eth_balance(perun_wallet::Account::address(&who))
            .await
            .unwrap()
            .is_zero()
    );
    drop(attached);
    // The node is untouched by the attached handle's drop.
    anvil.mine(1).await.unwrap();
    assert_eq!(anvil.block_number().await.unwrap(), height + 1);
    assert!(
        ProviderBuilder::new()
            .connect_ws(WsConnect::new(anvil.ws_url()))
            .await
            .is_ok()
    );
}

#[tokio::test]
async fn attach_to_nothing_fails() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Anvil::attach(&format!("ws://127.0.0.1:{port}"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("attaching"), "{err}");
}
