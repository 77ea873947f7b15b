//! An HTTP/1.1 client of the tower's API, for the users of a tower.
//!
//! Every call has a timeout ([`TowerClient::timeout`]) and reads at most
//! [`MAX_RESPONSE`] bytes of an answer, so a slow or hostile tower can
//! neither hang nor flood its user. Every signature the tower returns is
//! checked against the tower's address the user configured: a receipt or
//! a subscription not signed by that key is
//! [`Error::WrongTowerSignature`], never a success. A refusal keeps the
//! tower's stable error code ([`Error::Refused`]).
//!
//! Plain `http://` only: run the tower on loopback or a private network,
//! or behind a TLS-terminating proxy reached through a local tunnel.

use std::time::Duration;

use alloy_primitives::{Address, B256};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Bytes;
use perun_channel::{Params, SignedState};
use perun_wallet::{Account, parse_signature, recover, signature_bytes};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::json::{
    AddAppointmentRequest, AppointmentResponse, AppointmentStatus, ErrorBody,
    GetAppointmentRequest, GetSubscriptionRequest, ReceiptResponse, RegisterRequest,
    SubscriptionResponse,
};
use crate::messages::{self, Subscription};
use crate::scheme::{self, Locator};
use crate::{Error, Result};

/// Largest answer the client reads, in bytes (answers are a few hundred).
pub const MAX_RESPONSE: usize = 64 * 1024;
/// The default timeout of one call: connect, send, answer.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// An appointment ready to send: the locator, the blob and the user's
/// signature over [`messages::appointment_hash`]. The same appointment goes
/// to every tower (its signature names none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appointment {
    /// The locator.
    pub locator: Locator,
    /// The client's sequence number for this locator; must grow.
    pub seq: u64,
    /// The sealed blob.
    pub blob: Vec<u8>,
    /// The user's signature (65 bytes).
    pub signature: Vec<u8>,
}

impl Appointment {
    /// Seals `(params, signed)` ([`scheme::seal`]) and signs it with `user`.
    pub fn new(
        params: &Params,
        signed: &SignedState,
        seq: u64,
        user: &dyn Account,
    ) -> Result<Self> {
        let (locator, blob) = scheme::seal(params, signed)?;
        let hash = messages::appointment_hash(&locator, seq, &blob);
        let signature = signature_bytes(&user.sign_hash(hash)?).to_vec();
        Ok(Self {
            locator,
            seq,
            blob,
            signature,
        })
    }
}

/// A receipt the client checked: the tower's signed promise to watch an
/// appointment. With the blob it covers, it proves what the tower accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    /// The tower that signed it.
    pub tower: Address,
    /// The appointment's locator.
    pub locator: Locator,
    /// The tower watches from this block on.
    pub start_block: u64,
    /// The user's signature over the appointment (binds `seq` and the blob).
    pub user_signature: Vec<u8>,
    /// The tower's signature over [`messages::receipt_hash`].
    pub tower_signature: Vec<u8>,
}

impl Receipt {
    /// Checks that `tower_signature` is the tower's over this receipt.
    pub fn verify(&self) -> Result<()> {
        let hash = messages::receipt_hash(
            self.tower,
            &self.locator,
            self.start_block,
            &self.user_signature,
        );
        check_signer("receipt", hash, &self.tower_signature, self.tower)
    }
}

fn check_signer(what: &'static str, hash: B256, sig: &[u8], expected: Address) -> Result<()> {
    let found = parse_signature(sig)
        .ok()
        .and_then(|s| recover(hash, &s).ok());
    if found == Some(expected) {
        Ok(())
    } else {
        Err(Error::WrongTowerSignature {
            what,
            expected,
            found,
        })
    }
}

fn to_hex(b: &[u8]) -> String {
    format!("0x{}", hex::encode(b))
}

fn from_hex(field: &'static str, s: &str) -> Result<Vec<u8>> {
    hex::decode(s.strip_prefix("0x").unwrap_or(s)).map_err(|source| Error::BadHex { field, source })
}

/// Aborts the connection task when the call ends (or its timeout drops it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A client of one tower. Cheap to clone; one connection per call.
#[derive(Debug, Clone)]
pub struct TowerClient {
    url: String,
    host: String,
    port: u16,
    authority: String,
    tower: Address,
    timeout: Duration,
}

impl TowerClient {
    /// A client of the tower at `url` (`http://host[:port]`), whose
    /// signatures must recover to `tower`.
    pub fn new(url: &str, tower: Address) -> Result<Self> {
        let bad = |reason| Error::Url {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http:// is supported"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(bad("expected http://host[:port] without a path"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad("bad port"))?,
                None if after.is_empty() => 80,
                None => return Err(bad("bad port")),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad("bad port"))?),
                None => (authority.to_string(), 80),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        Ok(Self {
            url: url.to_string(),
            host,
            port,
            authority: authority.to_string(),
            tower,
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// The same client with another timeout per call.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The timeout of one call.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The tower's address (what its signatures must recover to).
    pub fn tower(&self) -> Address {
        self.tower
    }

    /// The tower's URL, as given.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Registers `user` (or renews its subscription: more slots, a later
    /// expiry). Returns the subscription, its signature checked.
    pub async fn register(&self, user: &dyn Account) -> Result<Subscription> {
        let hash = messages::register_hash(self.tower, user.address());
        let req = RegisterRequest {
            user: user.address(),
            signature: to_hex(&signature_bytes(&user.sign_hash(hash)?)),
        };
        let resp: SubscriptionResponse = self.post("register", "/register", &req).await?;
        self.check_subscription(user.address(), resp)
    }

    /// The subscription of `user`, its signature checked.
    pub async fn get_subscription_info(&self, user: &dyn Account) -> Result<Subscription> {
        let hash = messages::get_subscription_hash(self.tower, user.address());
        let req = GetSubscriptionRequest {
            user: user.address(),
            signature: to_hex(&signature_bytes(&user.sign_hash(hash)?)),
        };
        let resp: SubscriptionResponse = self
            .post("get_subscription_info", "/get_subscription_info", &req)
            .await?;
        self.check_subscription(user.address(), resp)
    }

    fn check_subscription(
        &self,
        user: Address,
        resp: SubscriptionResponse,
    ) -> Result<Subscription> {
        if resp.user != user {
            return Err(Error::WrongAnswer {
                what: "subscription",
            });
        }
        let sub = Subscription {
            slots_total: resp.slots_total,
            slots_used: resp.slots_used,
            expiry: resp.expiry,
        };
        let sig = from_hex("tower_signature", &resp.tower_signature)?;
        check_signer(
            "subscription",
            messages::subscription_hash(user, &sub),
            &sig,
            self.tower,
        )?;
        Ok(sub)
    }

    /// Sends an appointment; returns the tower's receipt once it is checked:
    /// for this locator and this user signature, and signed by the tower.
    pub async fn add_appointment(&self, a: &Appointment) -> Result<Receipt> {
        let req = AddAppointmentRequest {
            locator: a.locator,
            seq: a.seq,
            blob: to_hex(&a.blob),
            signature: to_hex(&a.signature),
        };
        let resp: ReceiptResponse = self
            .post("add_appointment", "/add_appointment", &req)
            .await?;
        let receipt = Receipt {
            tower: self.tower,
            locator: resp.locator,
            start_block: resp.start_block,
            user_signature: from_hex("user_signature", &resp.user_signature)?,
            tower_signature: from_hex("tower_signature", &resp.tower_signature)?,
        };
        if receipt.locator != a.locator || receipt.user_signature != a.signature {
            return Err(Error::WrongAnswer { what: "receipt" });
        }
        receipt.verify()?;
        Ok(receipt)
    }

    /// The status of `user`'s appointment with `locator`.
    pub async fn get_appointment(
        &self,
        user: &dyn Account,
        locator: Locator,
    ) -> Result<AppointmentStatus> {
        let hash = messages::get_appointment_hash(self.tower, &locator);
        let req = GetAppointmentRequest {
            locator,
            signature: to_hex(&signature_bytes(&user.sign_hash(hash)?)),
        };
        let resp: AppointmentResponse = self
            .post("get_appointment", "/get_appointment", &req)
            .await?;
        if resp.locator != locator {
            return Err(Error::WrongAnswer { what: "status" });
        }
        Ok(resp.status)
    }

    async fn post<Q: Serialize, T: DeserializeOwned>(
        &self,
        what: &'static str,
        path: &'static str,
        req: &Q,
    ) -> Result<T> {
        let body = serde_json::to_vec(req).map_err(Error::EncodeRequest)?;
        let (status, bytes) = tokio::time::timeout(self.timeout, self.exchange(path, body))
            .await
            .map_err(|_| Error::Timeout {
                what,
                after: self.timeout,
            })??;
        if !(200..300).contains(&status) {
            return Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(e) => Error::Refused {
                    status,
                    code: e.error.code,
                    message: e.error.message,
                },
                Err(_) => Error::Refused {
                    status,
                    code: String::new(),
                    message: String::from_utf8_lossy(&bytes).into_owned(),
                },
            });
        }
        serde_json::from_slice(&bytes).map_err(Error::BadResponse)
    }

    /// One request on a fresh connection: the status and the bounded body.
    async fn exchange(&self, path: &str, body: Vec<u8>) -> Result<(u16, Bytes)> {
        let http = |e: Box<dyn std::error::Error + Send + Sync>| Error::Http(e);
        let stream = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| http(e.into()))?;
        let _driver = AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "tower connection ended");
            }
        }));
        let req = hyper::Request::post(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| http(e.into()))?;
        let resp = sender.send_request(req).await.map_err(|e| http(e.into()))?;
        let status = resp.status().as_u16();
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    Error::ResponseTooLarge { max: MAX_RESPONSE }
                } else {
                    http(e)
                }
            })?
            .to_bytes();
        Ok((status, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let a = Address::repeat_byte(1);
        let c = TowerClient::new("http://127.0.0.1:8080/", a).expect("url");
        assert_eq!((c.host.as_str(), c.port), ("127.0.0.1", 8080));
        let c = TowerClient::new("http://[::1]:9", a).expect("url");
        assert_eq!((c.host.as_str(), c.port), ("::1", 9));
        let c = TowerClient::new("http://tower.local", a).expect("url");
        assert_eq!(c.port, 80);
        for bad in [
            "https://x:1",
            "x:1",
            "http://",
            "http://x:port",
            "http://x:1/path",
            "http://[::1",
        ] {
            assert!(
                matches!(TowerClient::new(bad, a), Err(Error::Url { .. })),
                "{bad}"
            );
        }
    }
}
