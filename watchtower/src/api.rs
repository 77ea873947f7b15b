//! The tower's HTTP/JSON API (axum).
//!
//! Every request body is one JSON object; unknown fields are refused. Byte
//! strings are hex (`0x` optional on input, always present on output);
//! addresses are `0x`-prefixed hex; signatures are 65 bytes `r ‖ s ‖ v`,
//! EIP-191 over the hashes in [`crate::messages`].
//!
//! # Endpoints
//!
//! `POST /register`
//! ```json
//! request:  { "user": "0x<20 bytes>", "signature": "0x<65 bytes over register_hash(tower, user)>" }
//! response: { "user": "0x..", "slots_total": 100, "slots_used": 0, "expiry": 1767225600,
//!             "tower_signature": "0x<65 bytes over subscription_hash(user, sub)>" }
//! ```
//! A new user gets `slots_per_registration` slots until `now + subscription_secs`;
//! a registered one gets as many more and a later expiry. A user whose
//! subscription expired more than `reclaim_after_secs` ago is dropped with
//! its appointments ([`Tower::reclaim`], every `reclaim_interval_secs`):
//! clients renew before expiry (`perun_client` does so by itself).
//!
//! `POST /add_appointment`
//! ```json
//! request:  { "locator": "0x<32 bytes>", "seq": 7, "blob": "0x<at most 32 KiB>",
//!             "signature": "0x<65 bytes over appointment_hash(locator, seq, blob)>" }
//! response: { "locator": "0x..", "start_block": 123, "user_signature": "0x..",
//!             "tower_signature": "0x<65 bytes over receipt_hash(tower, locator, start_block, user_signature)>" }
//! ```
//! The user is the signature's signer. The answer comes once the
//! appointment is durable. The same locator again with a higher `seq`
//! replaces the user's appointment and takes no slot; a lower or equal
//! `seq` is `stale_appointment` (a replayed or reordered request), except
//! the identical request again, which gets the stored receipt (a retry).
//!
//! `POST /get_appointment`
//! ```json
//! request:  { "locator": "0x..", "signature": "0x<65 bytes over get_appointment_hash(tower, locator)>" }
//! response: { "locator": "0x..", "status": "being_watched" | "dispute_triggered" | "resolved" | "not_found" }
//! ```
//!
//! `POST /get_subscription_info`
//! ```json
//! request:  { "user": "0x..", "signature": "0x<65 bytes over get_subscription_hash(tower, user)>" }
//! response: as for /register
//! ```
//!
//! `GET /health` → `{ "status": "ok", "tower": "0x<tower address>", "responder":
//! null | { "status": "starting" | "connecting" | "ok" | "retrying" | "stopped",
//! "cursor": <block>, "active_jobs": <n>, "error": null | "<text>" } }`
//!
//! `GET /metrics` → Prometheus text: `perun_tower_users`,
//! `perun_tower_appointments`, `perun_tower_requests_total{endpoint,status,code}`,
//! `perun_tower_reclaimed_users_total`, `perun_tower_reclaimed_appointments_total`,
//! and with a responder (`responder::Stats`) `perun_tower_disputes_seen_total`,
//! `perun_tower_refutations_total`, `perun_tower_conclusions_total`,
//! `perun_tower_bad_blobs_total`, `perun_tower_blobs_opened_total`,
//! `perun_tower_responder_retries_total`,
//! `perun_tower_active_jobs`, `perun_tower_cursor_block`, `perun_tower_responder_up`.
//!
//! # Errors
//!
//! `{ "error": { "code": "<code>", "message": "<text>" } }` with the status:
//!
//! | code | status | when |
//! |---|---|---|
//! | `malformed_request` | 400 | not JSON, a missing or unknown field, bad hex, a wrong length |
//! | `wrong_signature` | 401 | the signature is not canonical or not by the user |
//! | `unknown_user` | 404 | the signer never registered |
//! | `subscription_expired` | 403 | the subscription's expiry has passed |
//! | `no_free_slot` | 403 | every slot holds an appointment |
//! | `stale_appointment` | 409 | `seq` not above the stored appointment's (replay) |
//! | `blob_too_large` | 413 | a blob over [`MAX_BLOB_LEN`] |
//! | `body_too_large` | 413 | a body over [`Config::max_body`] |
//! | `rate_limited` | 429 | the IP's or the user's token bucket is empty |
//! | `not_found` | 404 | no such endpoint |
//! | `internal` | 500 | the store failed (logged) |
//!
//! Rate limits are token buckets in memory, one per IP (checked before any
//! signature is recovered) and one per user (checked after). Connections
//! are capped and must send their headers in time ([`serve`]).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use alloy_primitives::{Address, B256};
use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use perun_channel::throttle::Throttle;
use perun_wallet::{Account, LocalAccount, parse_signature, recover, signature_bytes};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{error, warn};

use crate::batch::Writer;
pub use crate::json::{
    AddAppointmentRequest, AppointmentResponse, AppointmentStatus, ErrorBody, ErrorDetail,
    GetAppointmentRequest, GetSubscriptionRequest, ReceiptResponse, RegisterRequest,
    SubscriptionResponse,
};
use crate::messages;
use crate::scheme::MAX_BLOB_LEN;
use crate::store::{NewAppointment, Status, Store, Subscription};
use crate::{Error, Result};

/// A token bucket's settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RateLimit {
    /// Requests allowed at once.
    pub burst: u32,
    /// Requests per second refilled.
    pub per_second: f64,
}

/// The API's settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Slots a registration gives.
    pub slots_per_registration: u32,
    /// How long a registration lasts, in seconds.
    pub subscription_secs: u64,
    /// Largest request body in bytes (room for a hex blob of `MAX_BLOB_LEN`).
    pub max_body: usize,
    /// The bucket of each client IP.
    pub ip_rate: RateLimit,
    /// The bucket of each user.
    pub user_rate: RateLimit,
    /// Most buckets kept per kind; full buckets are dropped first.
    pub max_buckets: usize,
    /// Most connections served at once.
    pub max_connections: usize,
    /// Seconds a connection has to send a request's headers.
    pub header_timeout_secs: u64,
    /// Seconds a request has, once its headers are in, to send its body and
    /// be answered; then it gets `408 request_timeout` and its connection
    /// is closed (a body that never comes must not hold a connection slot).
    pub request_timeout_secs: u64,
    /// Most users, appointments, and slots per user the store holds.
    pub store: crate::store::StoreLimits,
    /// Seconds after its expiry that a user and its appointments are
    /// dropped, giving their room back (0: never). Long enough for a client
    /// that was offline through its renewal window to come back and renew.
    pub reclaim_after_secs: u64,
    /// Seconds between two passes of [`Tower::reclaim`] while serving.
    pub reclaim_interval_secs: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            slots_per_registration: 10_000,
            subscription_secs: 365 * 24 * 60 * 60,
            max_body: 2 * MAX_BLOB_LEN + 4096,
            ip_rate: RateLimit {
                burst: 2_000,
                per_second: 1_000.0,
            },
            user_rate: RateLimit {
                burst: 1_000,
                per_second: 500.0,
            },
            max_buckets: 100_000,
            max_connections: 1024,
            header_timeout_secs: 10,
            request_timeout_secs: 10,
            store: crate::store::StoreLimits::default(),
            reclaim_after_secs: 90 * 24 * 60 * 60,
            reclaim_interval_secs: 60 * 60,
        }
    }
}

/// An API error: a stable code, an HTTP status and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The stable code.
    pub code: &'static str,
    /// What happened.
    pub message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn malformed(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "malformed_request", message)
    }

    fn wrong_signature(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "wrong_signature", message)
    }

    fn rate_limited(message: impl Into<String>) -> Self {
        Self::new(StatusCode::TOO_MANY_REQUESTS, "rate_limited", message)
    }
}

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        match e {
            Error::UnknownUser(_) => {
                Self::new(StatusCode::NOT_FOUND, "unknown_user", e.to_string())
            }
            Error::Expired { .. } => {
                Self::new(StatusCode::FORBIDDEN, "subscription_expired", e.to_string())
            }
            Error::NoFreeSlot { .. } => {
                Self::new(StatusCode::FORBIDDEN, "no_free_slot", e.to_string())
            }
            Error::Stale { .. } => {
                Self::new(StatusCode::CONFLICT, "stale_appointment", e.to_string())
            }
            Error::TowerFull { .. } => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, "tower_full", e.to_string())
            }
            Error::TooLarge { .. } => Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "blob_too_large",
                e.to_string(),
            ),
            other => {
                error!(error = %other, "tower request failed");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the tower failed; try again",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: ErrorDetail {
                code: self.code.to_string(),
                message: self.message,
            },
        };
        (self.status, axum::Json(body)).into_response()
    }
}

/// Parses a request body; anything that is not exactly a `T` is `malformed_request`.
pub fn decode_request<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::malformed(format!("body: {e}")))
}

/// Parses hex with or without `0x`.
pub fn decode_hex(field: &str, s: &str) -> Result<Vec<u8>, ApiError> {
    let s = s.strip_prefix("0x").unwrap_or(s);
    hex::decode(s).map_err(|e| ApiError::malformed(format!("{field}: {e}")))
}

fn to_hex(b: &[u8]) -> String {
    format!("0x{}", hex::encode(b))
}

/// Recovers the signer of `hash` from a hex signature.
fn signer(hash: B256, sig_hex: &str) -> Result<(Address, Vec<u8>), ApiError> {
    let bytes = decode_hex("signature", sig_hex)?;
    if bytes.len() != 65 {
        return Err(ApiError::malformed(format!(
            "signature: {} bytes, expected 65",
            bytes.len()
        )));
    }
    let sig = parse_signature(&bytes).map_err(|e| ApiError::wrong_signature(e.to_string()))?;
    let who = recover(hash, &sig).map_err(|e| ApiError::wrong_signature(e.to_string()))?;
    Ok((who, bytes))
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Token buckets by key.
struct Limiter<K> {
    rate: RateLimit,
    max: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq> Limiter<K> {
    fn new(rate: RateLimit, max: usize) -> Self {
        Self {
            rate,
            max,
            buckets: HashMap::new(),
        }
    }

    fn allow(&mut self, key: K, now: Instant) -> bool {
        let burst = f64::from(self.rate.burst);
        if self.buckets.len() >= self.max && !self.buckets.contains_key(&key) {
            // Drop buckets that have refilled: forgetting them changes nothing.
            let rate = self.rate.per_second;
            self.buckets.retain(|_, b| {
                b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
            });
            if self.buckets.len() >= self.max {
                // Still full of active keys: start over rather than grow.
                warn!(buckets = self.buckets.len(), "rate limiter full; resetting");
                self.buckets.clear();
            }
        }
        let b = self.buckets.entry(key).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(b.last).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.rate.per_second).min(burst);
        b.last = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The clock subscriptions expire by: unix seconds.
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The system clock.
pub fn system_clock() -> Clock {
    Arc::new(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// The API's shared state.
pub struct Tower {
    store: Store,
    account: Arc<LocalAccount>,
    config: Config,
    clock: Clock,
    writer: Writer,
    ip_limits: Mutex<Limiter<IpAddr>>,
    user_limits: Mutex<Limiter<Address>>,
    requests: Mutex<BTreeMap<(&'static str, u16, &'static str), u64>>,
    /// Warnings about refused requests, at most one a second each (anyone
    /// can send bad requests; the counters count them all).
    warn_refused: Mutex<Throttle>,
    warn_ip: Mutex<Throttle>,
    warn_user: Mutex<Throttle>,
    /// The responder's counters and health, once one runs.
    responder: std::sync::OnceLock<Arc<crate::responder::Stats>>,
    /// Users and appointments [`Tower::reclaim`] dropped.
    reclaimed: Mutex<crate::store::Reclaimed>,
}

impl std::fmt::Debug for Tower {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tower")
            .field("address", &self.account.address())
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Tower {
    /// A tower signing with `account`, storing in `store`; starts the
    /// appointment writer thread ([`crate::batch`]).
    pub fn new(
        store: Store,
        account: Arc<LocalAccount>,
        config: Config,
        clock: Clock,
    ) -> Result<Self> {
        let store = store.with_limits(config.store);
        let signer = Arc::clone(&account);
        let tower = signer.address();
        let writer = Writer::start(
            store.clone(),
            Arc::clone(&clock),
            Arc::new(move |locator, start, user_sig| {
                let hash = messages::receipt_hash(tower, locator, start, user_sig);
                Ok(signature_bytes(&signer.sign_hash(hash)?).to_vec())
            }),
        )?;
        Ok(Self {
            writer,
            ip_limits: Mutex::new(Limiter::new(config.ip_rate, config.max_buckets)),
            user_limits: Mutex::new(Limiter::new(config.user_rate, config.max_buckets)),
            requests: Mutex::new(BTreeMap::new()),
            warn_refused: Mutex::default(),
            warn_ip: Mutex::default(),
            warn_user: Mutex::default(),
            responder: std::sync::OnceLock::new(),
            reclaimed: Mutex::default(),
            store,
            account,
            config,
            clock,
        })
    }

    /// The tower's address (what its signatures recover to).
    pub fn address(&self) -> Address {
        self.account.address()
    }

    /// Reports `stats` in `/health` and `/metrics` (the first call wins).
    pub fn set_responder(&self, stats: Arc<crate::responder::Stats>) {
        let _ = self.responder.set(stats);
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Drops every user whose subscription expired more than
    /// [`Config::reclaim_after_secs`] ago, with its appointments (those in a
    /// running dispute stay), in short transactions ([`Store::reclaim`]: at
    /// most 1,000 users looked at and 10,000 appointments dropped each);
    /// returns what it dropped. [`serve`] calls it every
    /// [`Config::reclaim_interval_secs`].
    pub async fn reclaim(self: &Arc<Self>) -> Result<crate::store::Reclaimed> {
        self.reclaim_until(&tokio::sync::watch::channel(false).1)
            .await
    }

    /// [`Tower::reclaim`], stopping between two transactions once `stop`
    /// turns true.
    async fn reclaim_until(
        self: &Arc<Self>,
        stop: &tokio::sync::watch::Receiver<bool>,
    ) -> Result<crate::store::Reclaimed> {
        const USERS: usize = 1_000;
        const APPOINTMENTS: usize = 10_000;
        let mut total = crate::store::Reclaimed::default();
        if self.config.reclaim_after_secs == 0 {
            total.done = true;
            return Ok(total);
        }
        let before = (self.clock)().saturating_sub(self.config.reclaim_after_secs);
        let mut after = None;
        while !*stop.borrow() {
            let store = self.store.clone();
            let r = tokio::task::spawn_blocking(move || {
                store.reclaim(before, after, USERS, APPOINTMENTS)
            })
            .await??;
            total.users += r.users;
            total.appointments += r.appointments;
            total.undecodable += r.undecodable;
            {
                let mut all = self
                    .reclaimed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                all.users += r.users;
                all.appointments += r.appointments;
            }
            after = r.next;
            if r.done {
                total.done = true;
                break;
            }
        }
        if total.users > 0 || total.appointments > 0 {
            tracing::info!(
                users = total.users,
                appointments = total.appointments,
                "reclaimed what users whose subscription expired long ago held"
            );
        }
        if total.undecodable > 0 {
            warn!(
                values = total.undecodable,
                "values in the store do not decode; their users were not reclaimed"
            );
        }
        Ok(total)
    }

    fn check_ip(&self, ip: IpAddr) -> Result<(), ApiError> {
        let ok = self
            .ip_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(client_of(ip), Instant::now());
        if ok {
            Ok(())
        } else {
            if let Some(suppressed) = may_warn(&self.warn_ip) {
                warn!(%ip, suppressed, "rate limited (ip)");
            }
            Err(ApiError::rate_limited(format!(
                "too many requests from {ip}"
            )))
        }
    }

    fn check_user(&self, user: Address) -> Result<(), ApiError> {
        let ok = self
            .user_limits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .allow(user, Instant::now());
        if ok {
            Ok(())
        } else {
            if let Some(suppressed) = may_warn(&self.warn_user) {
                warn!(%user, suppressed, "rate limited (user)");
            }
            Err(ApiError::rate_limited(format!(
                "too many requests from {user}"
            )))
        }
    }

    fn count(&self, endpoint: &'static str, status: StatusCode, code: &'static str) {
        *self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry((endpoint, status.as_u16(), code))
            .or_insert(0) += 1;
    }

    fn sign(&self, hash: B256) -> Result<String> {
        Ok(to_hex(&signature_bytes(&self.account.sign_hash(hash)?)))
    }

    fn subscription_response(
        &self,
        user: Address,
        sub: Subscription,
    ) -> Result<SubscriptionResponse> {
        Ok(SubscriptionResponse {
            user,
            slots_total: sub.slots_total,
            slots_used: sub.slots_used,
            expiry: sub.expiry,
            tower_signature: self.sign(messages::subscription_hash(user, &sub))?,
        })
    }

    /// Runs blocking store work off the executor.
    async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Tower) -> Result<T> + Send + 'static,
    ) -> Result<T, ApiError> {
        let me = Arc::clone(self);
        match tokio::task::spawn_blocking(move || f(&me)).await {
            Ok(r) => r.map_err(ApiError::from),
            Err(e) => {
                error!(error = %e, "store task failed");
                Err(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "the tower failed; try again",
                ))
            }
        }
    }

    async fn register(self: &Arc<Self>, body: &[u8]) -> Result<SubscriptionResponse, ApiError> {
        let req: RegisterRequest = decode_request(body)?;
        let (who, _) = signer(
            messages::register_hash(self.address(), req.user),
            &req.signature,
        )?;
        if who != req.user {
            return Err(ApiError::wrong_signature(format!(
                "signed by {who}, not {}",
                req.user
            )));
        }
        self.check_user(req.user)?;
        let user = req.user;
        self.blocking(move |t| {
            let expiry = (t.clock)().saturating_add(t.config.subscription_secs);
            let sub = t
                .store
                .register(user, t.config.slots_per_registration, expiry)?;
            t.subscription_response(user, sub)
        })
        .await
    }

    async fn add_appointment(self: &Arc<Self>, body: &[u8]) -> Result<ReceiptResponse, ApiError> {
        let req: AddAppointmentRequest = decode_request(body)?;
        let blob = decode_hex("blob", &req.blob)?;
        if blob.len() > MAX_BLOB_LEN {
            return Err(Error::TooLarge {
                len: blob.len(),
                max: MAX_BLOB_LEN,
            }
            .into());
        }
        let (locator, seq) = (req.locator, req.seq);
        let (user, user_sig) = signer(
            messages::appointment_hash(&locator, seq, &blob),
            &req.signature,
        )?;
        self.check_user(user)?;
        let added = self
            .writer
            .add(NewAppointment {
                user,
                locator,
                seq,
                blob,
                user_signature: user_sig,
            })
            .await?;
        let r = added.receipt;
        Ok(ReceiptResponse {
            locator: r.locator,
            start_block: r.start_block,
            user_signature: to_hex(&r.user_signature),
            tower_signature: to_hex(&r.tower_signature),
        })
    }

    async fn get_appointment(
        self: &Arc<Self>,
        body: &[u8],
    ) -> Result<AppointmentResponse, ApiError> {
        let req: GetAppointmentRequest = decode_request(body)?;
        let locator = req.locator;
        let (user, _) = signer(
            messages::get_appointment_hash(self.address(), &locator),
            &req.signature,
        )?;
        self.check_user(user)?;
        self.blocking(move |t| {
            if t.store.subscription(user)?.is_none() {
                return Err(Error::UnknownUser(user));
            }
            let status = match t.store.appointment(user, locator)? {
                None => AppointmentStatus::NotFound,
                Some(a) => match a.status {
                    Status::BeingWatched => AppointmentStatus::BeingWatched,
                    Status::DisputeTriggered => AppointmentStatus::DisputeTriggered,
                    Status::Resolved => AppointmentStatus::Resolved,
                },
            };
            Ok(AppointmentResponse { locator, status })
        })
        .await
    }

    async fn get_subscription(
        self: &Arc<Self>,
        body: &[u8],
    ) -> Result<SubscriptionResponse, ApiError> {
        let req: GetSubscriptionRequest = decode_request(body)?;
        let (who, _) = signer(
            messages::get_subscription_hash(self.address(), req.user),
            &req.signature,
        )?;
        if who != req.user {
            return Err(ApiError::wrong_signature(format!(
                "signed by {who}, not {}",
                req.user
            )));
        }
        self.check_user(who)?;
        self.blocking(move |t| match t.store.subscription(who)? {
            Some(sub) => t.subscription_response(who, sub),
            None => Err(Error::UnknownUser(who)),
        })
        .await
    }

    async fn metrics(self: &Arc<Self>) -> Result<String, ApiError> {
        let (users, appointments) = self.blocking(|t| t.store.counts()).await?;
        let mut out = String::new();
        out.push_str(
            "# HELP perun_tower_users Registered users.\n# TYPE perun_tower_users gauge\n",
        );
        out.push_str(&format!("perun_tower_users {users}\n"));
        out.push_str(
            "# HELP perun_tower_appointments Stored appointments.\n# TYPE perun_tower_appointments gauge\n",
        );
        out.push_str(&format!("perun_tower_appointments {appointments}\n"));
        out.push_str(
            "# HELP perun_tower_requests_total Requests answered, by endpoint, HTTP status and code.\n# TYPE perun_tower_requests_total counter\n",
        );
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        for ((endpoint, status, code), n) in requests {
            out.push_str(&format!(
                "perun_tower_requests_total{{endpoint=\"{endpoint}\",status=\"{status}\",code=\"{code}\"}} {n}\n"
            ));
        }
        let reclaimed = *self
            .reclaimed
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (name, help, value) in [
            (
                "perun_tower_reclaimed_users_total",
                "Users dropped long after their subscription expired.",
                reclaimed.users,
            ),
            (
                "perun_tower_reclaimed_appointments_total",
                "Their appointments.",
                reclaimed.appointments,
            ),
        ] {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}\n"
            ));
        }
        if let Some(r) = self.responder.get() {
            out.push_str(&r.metrics_text());
        }
        Ok(out)
    }
}

type Shared = Arc<Tower>;

/// The client a request counts against: an IPv4 address, or an IPv6
/// address's /64 (one host gets a whole /64, and keyed by full address it
/// would get a bucket per address it picks). An IPv4 address mapped into
/// IPv6 counts as itself.
fn client_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(std::net::Ipv6Addr::from(prefix))
            }
        },
    }
}

/// Whether a warning of `kind` may be logged now (see [`Throttle`]).
fn may_warn(kind: &Mutex<Throttle>) -> Option<u64> {
    kind.lock().unwrap_or_else(PoisonError::into_inner).pass()
}

/// Runs one POST endpoint: the IP bucket, the body, the handler, the count.
async fn post_endpoint<T, F, Fut>(
    tower: Shared,
    endpoint: &'static str,
    peer: SocketAddr,
    body: Result<Bytes, BytesRejection>,
    handler: F,
) -> Response
where
    T: Serialize,
    F: FnOnce(Shared, Bytes) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let result = async {
        tower.check_ip(peer.ip())?;
        let body = body.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("body over {} bytes", tower.config.max_body),
                )
            } else {
                ApiError::malformed(e.body_text())
            }
        })?;
        handler(Arc::clone(&tower), body).await
    }
    .await;
    match result {
        Ok(v) => {
            tower.count(endpoint, StatusCode::OK, "ok");
            axum::Json(v).into_response()
        }
        Err(e) => {
            if e.status != StatusCode::INTERNAL_SERVER_ERROR
                && let Some(suppressed) = may_warn(&tower.warn_refused)
            {
                warn!(%peer, endpoint, code = e.code, message = %e.message, suppressed, "refused");
            }
            tower.count(endpoint, e.status, e.code);
            e.into_response()
        }
    }
}

/// One POST route: its path, its name in the counters, the [`Tower`] method
/// that answers it.
macro_rules! post_route {
    ($router:expr, $path:literal, $name:literal, $method:ident) => {
        $router.route(
            $path,
            post(
                |State(t): State<Shared>,
                 ConnectInfo(peer): ConnectInfo<SocketAddr>,
                 body: Result<Bytes, BytesRejection>| async move {
                    post_endpoint(
                        t,
                        $name,
                        peer,
                        body,
                        |t, b| async move { t.$method(&b).await },
                    )
                    .await
                },
            ),
        )
    };
}

/// The API's routes.
pub fn router(tower: Shared) -> Router {
    let limit = tower.config.max_body;
    let routes = Router::new();
    let routes = post_route!(routes, "/register", "register", register);
    let routes = post_route!(
        routes,
        "/add_appointment",
        "add_appointment",
        add_appointment
    );
    let routes = post_route!(
        routes,
        "/get_appointment",
        "get_appointment",
        get_appointment
    );
    let routes = post_route!(
        routes,
        "/get_subscription_info",
        "get_subscription_info",
        get_subscription
    );
    routes
        .route(
            "/health",
            get(|State(t): State<Shared>| async move {
                t.count("health", StatusCode::OK, "ok");
                let responder = t.responder.get().map(|r| r.health_json());
                axum::Json(
                    serde_json::json!({ "status": "ok", "tower": t.address(), "responder": responder }),
                )
            }),
        )
        .route(
            "/metrics",
            get(|State(t): State<Shared>| async move {
                match t.metrics().await {
                    Ok(text) => (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        text,
                    )
                        .into_response(),
                    Err(e) => e.into_response(),
                }
            }),
        )
        .fallback(|State(t): State<Shared>| async move {
            t.count("unknown", StatusCode::NOT_FOUND, "not_found");
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&tower),
            within_request_timeout,
        ))
        .with_state(tower)
}

/// Bounds a request from its headers on: reading its body and answering it
/// (see [`Config::request_timeout_secs`]). On expiry the request is dropped
/// (a write it started still lands; a retry gets its stored answer) and the
/// client hears `408`.
async fn within_request_timeout(
    State(t): State<Shared>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let limit = std::time::Duration::from_secs(t.config.request_timeout_secs.max(1));
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(response) => response,
        Err(_) => {
            t.count("any", StatusCode::REQUEST_TIMEOUT, "request_timeout");
            let mut response = ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!("no complete request within {limit:?}"),
            )
            .into_response();
            // The rest of the body may never come: do not wait for it.
            response.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            response
        }
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
///
/// At most [`Config::max_connections`] connections are served at once (the
/// next waits in the listen backlog), and a connection that does not send
/// a request's headers within [`Config::header_timeout_secs`] is closed, so
/// idle or slow sockets cannot pin the tower. On shutdown it stops
/// accepting, lets open connections finish for up to 5 s, then drops them.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tower: Shared,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let header_timeout = std::time::Duration::from_secs(tower.config.header_timeout_secs.max(1));
    let permits = Arc::new(tokio::sync::Semaphore::new(
        tower.config.max_connections.max(1),
    ));
    let (stop_reclaims, reclaims_stopped) = tokio::sync::watch::channel(false);
    let reclaims = tokio::spawn(reclaim_every_interval(Arc::clone(&tower), reclaims_stopped));
    let app = router(tower);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => break,
            p = Arc::clone(&permits).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: back off, keep serving.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        let svc = TowerToHyperService::new(app.clone().layer(axum::Extension(ConnectInfo(peer))));
        conns.spawn(async move {
            let _permit = permit;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "connection ended");
            }
        });
    }
    // A pass stops between two transactions; waiting for it means no
    // transaction of it outlives `serve` (the store could not be reopened).
    let _ = stop_reclaims.send(true);
    if let Err(e) = reclaims.await {
        error!(error = %e, "the reclaim task failed");
    }
    let drain = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(std::time::Duration::from_secs(5), drain)
        .await
        .is_err()
    {
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }
    Ok(())
}

/// Runs [`Tower::reclaim`] every [`Config::reclaim_interval_secs`] (the
/// first pass one interval after the start) until `stop` turns true; a
/// failed pass is logged and the next interval tries again.
async fn reclaim_every_interval(tower: Shared, mut stop: tokio::sync::watch::Receiver<bool>) {
    if tower.config.reclaim_after_secs == 0 {
        return;
    }
    let every = std::time::Duration::from_secs(tower.config.reclaim_interval_secs.max(1));
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if let Err(e) = tower.reclaim_until(&stop).await {
            warn!(error = %e, ?every, "reclaiming expired users failed; trying again next interval");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn an_ipv6_host_counts_as_its_64() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("ip");
        let net = client_of(ip("2001:db8:1:2::1"));
        assert_eq!(client_of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")), net);
        assert_ne!(client_of(ip("2001:db8:1:3::1")), net);
        assert_eq!(client_of(ip("::ffff:10.0.0.1")), ip("10.0.0.1"));
        assert_eq!(client_of(ip("10.0.0.1")), ip("10.0.0.1"));
        // One bucket for the whole /64: a host cannot pick fresh addresses.
        let rate = RateLimit {
            burst: 1,
            per_second: 0.001,
        };
        let mut l = Limiter::new(rate, 100);
        let t0 = Instant::now();
        assert!(l.allow(client_of(ip("2001:db8:1:2::1")), t0));
        assert!(!l.allow(client_of(ip("2001:db8:1:2::2")), t0));
    }

    #[test]
    fn bucket_refills_and_the_map_stays_bounded() {
        let rate = RateLimit {
            burst: 2,
            per_second: 1.0,
        };
        let mut l = Limiter::new(rate, 3);
        let t0 = Instant::now();
        assert!(l.allow(1u32, t0));
        assert!(l.allow(1, t0));
        assert!(!l.allow(1, t0));
        assert!(l.allow(1, t0 + Duration::from_millis(1100)));
        // Many keys: never more than `max` buckets.
        for k in 2..100u32 {
            l.allow(k, t0);
            assert!(l.buckets.len() <= 3);
        }
        // Refilled buckets are dropped first, so an active key keeps its state.
        let mut l = Limiter::new(rate, 2);
        assert!(l.allow(1u32, t0));
        assert!(l.allow(2, t0));
        assert!(l.allow(2, t0));
        assert!(l.allow(3, t0 + Duration::from_millis(1500)));
        assert!(!l.buckets.contains_key(&1), "refilled: dropped");
        assert!(l.buckets.contains_key(&2), "still draining: kept");
    }
}
