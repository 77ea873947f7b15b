//! The binary starts from flags and from a config file, serves the API and
//! refuses bad settings.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use perun_wallet::LocalAccount;
use perun_wallet::keystore::{self, ScryptParams};

const BIN: &str = env!("CARGO_BIN_EXE_perun-watchtower");

struct Kill(Child);
impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

#[tokio::test]
async fn serves_health_from_a_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let account = LocalAccount::random();
    let ks = dir.path().join("tower.json");
    keystore::save(&account, &ks, "pw", ScryptParams::LIGHT).expect("keystore");
    std::fs::write(dir.path().join("pw"), "pw\n").expect("password");
    let port = free_port();
    let config = dir.path().join("tower.toml");
    std::fs::write(
        &config,
        format!(
            "rpc = \"ws://127.0.0.1:8545\"\nadjudicator = \"0x00000000000000000000000000000000000000ad\"\nkeystore = {:?}\npassword_file = {:?}\ndb = {:?}\nlisten = \"127.0.0.1:{port}\"\n[api]\nslots_per_registration = 5\n",
            ks,
            dir.path().join("pw"),
            dir.path().join("tower.redb"),
        ),
    )
    .expect("config");
    let _child = Kill(
        Command::new(BIN)
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn"),
    );
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let r = common::get(addr, "/health").await;
            assert_eq!(r.status, 200);
            let tower: perun_wallet::Address =
                serde_json::from_value(r.json()["tower"].clone()).expect("address");
            assert_eq!(tower, perun_wallet::Account::address(&account));
            // No node at --rpc: the API serves, the responder keeps trying.
            let responder = r.json()["responder"]["status"].clone();
            assert!(
                responder == "connecting" || responder == "starting",
                "{responder}"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the tower never listened");
}

#[test]
fn refuses_missing_flags_and_http_rpc() {
    let out = Command::new(BIN).output().expect("run");
    assert!(!out.status.success());
    let out = Command::new(BIN)
        .args([
            "--rpc",
            "http://x",
            "--adjudicator",
            "0x00000000000000000000000000000000000000ad",
        ])
        .args(["--keystore", "k", "--db", "d", "--listen", "127.0.0.1:1"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ws://"));
}

#[test]
fn help_explains_every_flag() {
    let out = Command::new(BIN).arg("--help").output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--rpc",
        "--adjudicator",
        "--keystore",
        "--password-file",
        "--db",
        "--listen",
        "--config",
    ] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
}
