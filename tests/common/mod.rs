//! The functional test harness: n clients on one ledger (SimLedger, or
//! anvil with the real contracts and redb), talking over real libp2p on
//! 127.0.0.1.

#![allow(dead_code, unreachable_pub, missing_docs, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use perun::adjudicator::testing::Anvil;
use perun::adjudicator::{
    Adjudicator, Deployment, EthAdjudicator, EthConfig, EthFunder, Funder, SimLedger,
};
use perun::channel::{Address, Allocation, Asset, ChannelId, U256};
use perun::client::{
    AcceptAllForTesting, Channel, ChannelProposal, Client, Participant, ProposalHandler, Timeouts,
    UpdateHandler,
};
use perun::persistence::{Change, ChannelRecord, MemoryPersister, Persister, RedbPersister};
use perun::wallet::{Account, LocalAccount};
use perun::wire::Keypair;

pub mod flaky;
pub mod game;
pub mod relay;
pub mod sign_log;

/// Runs each named role test against both ledgers: `SimLedger` with the
/// in-memory store, and anvil (real contracts) with redb.
#[macro_export]
macro_rules! on_both_ledgers {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sim() {
                super::$name($crate::common::Ledger::sim().await).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn anvil() {
                super::$name($crate::common::Ledger::anvil().await).await
            }
        }
    )*};
}

/// Where the money is.
#[allow(clippy::large_enum_variant)] // One per test; EthConfig carries the fee and timeout settings.
pub enum Ledger {
    /// In memory, with a controllable clock.
    Sim(Arc<SimLedger>),
    /// Real contracts on a real local node.
    Anvil {
        anvil: Box<Anvil>,
        deployment: Deployment,
        config: EthConfig,
    },
}

/// The holder the simulated ledger uses for its one asset.
const SIM_HOLDER: Address = Address::repeat_byte(0xaa);

impl Ledger {
    pub async fn sim() -> Self {
        let sim = SimLedger::new(1337);
        sim.add_asset(SIM_HOLDER);
        Ledger::Sim(Arc::new(sim))
    }

    pub async fn anvil() -> Self {
        let anvil = Anvil::spawn().await.expect("anvil (run cargo xtask setup)");
        let deployer = anvil.funded_account().await.expect("deployer");
        let provider = anvil.provider(&deployer).await.expect("provider");
        let deployment = perun::adjudicator::deploy(&provider)
            .await
            .expect("deploy contracts");
        let config = EthConfig::from_deployment(&deployment);
        Ledger::Anvil {
            anvil: Box::new(anvil),
            deployment,
            config,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Ledger::Sim(_) => "sim",
            Ledger::Anvil { .. } => "anvil",
        }
    }

    /// The asset channels are opened in: the test token on anvil (so
    /// balances are exact, untouched by gas).
    pub fn asset(&self) -> Asset {
        match self {
            Ledger::Sim(sim) => Asset {
                chainId: sim.chain_id(),
                holder: SIM_HOLDER,
            },
            Ledger::Anvil { deployment, .. } => Asset {
                chainId: U256::from(perun::adjudicator::testing::CHAIN_ID),
                holder: deployment.erc20_holder,
            },
        }
    }

    /// A new account holding `amount` of the asset (and gas money on anvil).
    pub async fn account(&self, amount: U256) -> LocalAccount {
        match self {
            Ledger::Sim(sim) => {
                let a = LocalAccount::random();
                sim.mint(SIM_HOLDER, a.address(), amount);
                a
            }
            Ledger::Anvil {
                anvil, deployment, ..
            } => {
                let a = anvil.funded_account().await.unwrap();
                anvil
                    .mint_token(deployment.token, &a, amount)
                    .await
                    .unwrap();
                a
            }
        }
    }

    /// `who`'s balance of the asset outside any channel.
    pub async fn balance(&self, who: Address) -> U256 {
        match self {
            Ledger::Sim(sim) => sim.balance(SIM_HOLDER, who),
            Ledger::Anvil {
                anvil, deployment, ..
            } => anvil.token_balance(deployment.token, who).await.unwrap(),
        }
    }

    /// The chain backends for `account`.
    pub async fn backends(
        &self,
        account: &LocalAccount,
    ) -> (Arc<dyn Funder>, Arc<dyn Adjudicator>) {
        match self {
            Ledger::Sim(sim) => (sim.clone(), sim.clone()),
            Ledger::Anvil { anvil, config, .. } => {
                let url = anvil.ws_url();
                let f = EthFunder::connect(&url, account, config.clone())
                    .await
                    .unwrap();
                let a = EthAdjudicator::connect(&url, account, config.clone())
                    .await
                    .unwrap();
                (Arc::new(f), Arc::new(a))
            }
        }
    }

    /// The tic-tac-toe app: `TicTacToeApp.sol` deployed on anvil, the Rust
    /// rules at a fixed address on the simulated ledger.
    pub async fn tictactoe(&self) -> Address {
        match self {
            Ledger::Sim(sim) => {
                let app = Address::repeat_byte(0x77);
                sim.add_app(app, Arc::new(perun::channel::tictactoe::TicTacToe));
                app
            }
            Ledger::Anvil { anvil, .. } => {
                let deployer = anvil.funded_account().await.unwrap();
                let provider = anvil.provider(&deployer).await.unwrap();
                perun::adjudicator::deploy_tictactoe(&provider)
                    .await
                    .unwrap()
            }
        }
    }

    /// Moves the chain's clock forward.
    pub async fn advance(&self, secs: u64) {
        match self {
            Ledger::Sim(sim) => sim.advance(secs),
            Ledger::Anvil { anvil, .. } => anvil.increase_time(secs).await.unwrap(),
        }
    }
}

/// One participant: its client, key, and the channels it accepted.
pub struct Party {
    pub client: Client,
    pub account: Arc<LocalAccount>,
    pub key: Keypair,
    pub persister: Arc<dyn Persister>,
    pub opened: perun::client::Opened,
    pub dir: Option<tempfile::TempDir>,
}

/// Stops party `of`'s client and starts a raw wire endpoint with its
/// network key in its place, introduced to party `to`'s client and back:
/// an "evil twin" that sends whatever a test likes, as that party. Returns
/// the endpoint, its incoming requests and the party's signing key.
#[allow(dead_code)] // Not every test file has a twin.
pub async fn evil_twin(
    ps: &[Party],
    of: usize,
    to: usize,
) -> (perun::wire::Handle, perun::wire::Incoming, LocalAccount) {
    let victim = &ps[of];
    let key = LocalAccount::from_bytes(&victim.account.secret_bytes()).unwrap();
    victim.client.shutdown().await;
    let (evil, evil_in) = perun::wire::Node::start(perun::wire::Config::new(victim.key.clone()))
        .await
        .unwrap();
    let client = &ps[to].client;
    for addr in client.listen_addrs().await.unwrap() {
        evil.add_address(client.peer_id(), addr).await.unwrap();
    }
    for addr in evil.listen_addrs().await.unwrap() {
        client.add_peer(evil.local_peer_id(), addr).await.unwrap();
    }
    (evil, evil_in, key)
}

/// A twin's honest answer to `update`: participant `index`'s signature
/// over its state, made with `key`.
#[allow(dead_code)] // Not every test file has a twin.
pub fn accept(
    key: &LocalAccount,
    update: &perun::wire::Update,
    index: usize,
) -> perun::wire::Message {
    perun::wire::Message::UpdateAccept(perun::wire::UpdateAccept {
        channel_id: update.channel_id,
        version: update.state.version,
        index,
        signature: key.sign_hash(update.state.hash()).unwrap(),
    })
}

impl Party {
    pub fn participant(&self) -> Participant {
        Participant {
            address: self.client.address(),
            peer: self.client.peer_id(),
        }
    }

    /// The next channel this party accepted.
    pub async fn accepted(&mut self) -> Channel {
        tokio::time::timeout(Duration::from_secs(60), self.opened.recv())
            .await
            .expect("a channel within 60 s")
            .expect("handler alive")
            .expect("channel opened")
    }
}

/// Wraps a party's store (e.g. to inject failures).
pub type WrapPersister = Box<dyn Fn(Arc<dyn Persister>) -> Arc<dyn Persister>>;
/// Wraps a party's adjudicator (e.g. to inject failures).
pub type WrapAdjudicator = Box<dyn Fn(Arc<dyn Adjudicator>) -> Arc<dyn Adjudicator>>;

pub struct Options {
    pub update_handler: Option<Arc<dyn UpdateHandler>>,
    pub proposal_handler: Option<Arc<dyn ProposalHandler>>,
    pub funder: Option<Arc<dyn Funder>>,
    pub funding_timeout: Duration,
    /// Wraps the party's store (e.g. to inject failures).
    pub wrap_persister: Option<WrapPersister>,
    /// Wraps the party's adjudicator (e.g. to inject failures).
    pub wrap_adjudicator: Option<WrapAdjudicator>,
    /// Timeouts instead of the test defaults ([`test_timeouts`]).
    pub timeouts: Option<Timeouts>,
    /// The wire's request timeout (default 10 s).
    pub request_timeout: Option<Duration>,
    /// The party listens nowhere (it only dials out).
    pub dial_only: bool,
    /// Caps on remote input instead of the defaults.
    pub limits: Option<perun::client::Limits>,
    /// Watchtowers the party keeps appointments with.
    pub towers: Vec<perun::client::TowerConfig>,
    /// When it sends appointments.
    pub policy: perun::client::AppointmentPolicy,
    /// A redb store in a temp dir on the simulated ledger too.
    pub redb: bool,
    /// App rules by contract address.
    pub apps: Vec<(Address, Arc<dyn perun::channel::App>)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            update_handler: None,
            proposal_handler: None,
            funder: None,
            funding_timeout: Duration::from_secs(30),
            wrap_persister: None,
            wrap_adjudicator: None,
            timeouts: None,
            request_timeout: None,
            dial_only: false,
            limits: None,
            towers: Vec::new(),
            policy: perun::client::AppointmentPolicy::default(),
            redb: false,
            apps: Vec::new(),
        }
    }
}

/// The timeouts test clients run with: fast polls, a cooperative settle
/// short enough for a silent peer (10 s: at 3 s a loaded machine could see
/// an answering peer's final update run out and the channel disputed).
pub fn test_timeouts(funding: Duration) -> Timeouts {
    Timeouts {
        funding,
        dispute_poll: Duration::from_millis(50),
        settle_cooperative: Duration::from_secs(10),
        retry_min: Duration::from_millis(50),
        retry_max: Duration::from_secs(2),
        ..Timeouts::default()
    }
}

/// Logs to the test's output when `RUST_LOG` is set.
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Builds one party on `ledger`, with a redb store on anvil.
pub async fn party(ledger: &Ledger, deposit: U256, opts: &Options) -> Party {
    let account = ledger.account(deposit).await;
    party_with_account(ledger, account, opts).await
}

/// Builds one party with `account` (funded already) on `ledger`.
pub async fn party_with_account(ledger: &Ledger, account: LocalAccount, opts: &Options) -> Party {
    init_logs();
    let (funder, adjudicator) = ledger.backends(&account).await;
    let key = perun::wire::generate_key();
    let (persister, dir): (Arc<dyn Persister>, _) = match ledger {
        Ledger::Sim(_) if !opts.redb => (Arc::new(MemoryPersister::new()), None),
        _ => {
            let dir = tempfile::tempdir().unwrap();
            let p = RedbPersister::open(dir.path().join("perun.redb"))
                .await
                .unwrap();
            (Arc::new(p), Some(dir))
        }
    };
    let account = Arc::new(account);
    let persister = match &opts.wrap_persister {
        Some(wrap) => wrap(persister),
        None => persister,
    };
    let funder = opts.funder.clone().unwrap_or(funder);
    let adjudicator = match &opts.wrap_adjudicator {
        Some(wrap) => wrap(adjudicator),
        None => adjudicator,
    };
    start(account, key, funder, adjudicator, persister, dir, opts).await
}

/// Builds a party's client from its parts.
async fn start(
    account: Arc<LocalAccount>,
    key: Keypair,
    funder: Arc<dyn Funder>,
    adjudicator: Arc<dyn Adjudicator>,
    persister: Arc<dyn Persister>,
    dir: Option<tempfile::TempDir>,
    opts: &Options,
) -> Party {
    let (accept_all, opened) = AcceptAllForTesting::new();
    let mut timeouts = opts
        .timeouts
        .unwrap_or_else(|| test_timeouts(opts.funding_timeout));
    if let Some(t) = opts.request_timeout {
        // A short request timeout needs a handler that answers within it.
        timeouts.request = t;
        timeouts.handler = timeouts.handler.min(t * 2 / 3);
    }
    let mut builder = Client::builder()
        .account(account.clone())
        .network_key(key.clone())
        .funder(funder)
        .adjudicator(adjudicator)
        .persister(persister.clone())
        .proposal_handler(opts.proposal_handler.clone().unwrap_or(accept_all.clone()))
        .update_handler(opts.update_handler.clone().unwrap_or(accept_all))
        .timeouts(timeouts);
    if opts.dial_only {
        builder = builder.dial_only();
    }
    if let Some(limits) = opts.limits {
        builder = builder.limits(limits);
    }
    for t in &opts.towers {
        builder = builder.watchtower(t.clone());
    }
    builder = builder.appointment_policy(opts.policy);
    for (address, app) in &opts.apps {
        builder = builder.app(*address, app.clone());
    }
    let client = builder.build().await.unwrap();
    Party {
        client,
        account,
        key,
        persister,
        opened,
        dir,
    }
}

/// Stops `p`'s client and starts a new one from the same key, account and
/// store (on anvil the redb file is closed and reopened from disk), as after
/// a crash of the process.
pub async fn restart(ledger: &Ledger, p: Party) -> Party {
    restart_inner(ledger, p, None, &Options::default()).await
}

/// Like [`restart`], with `opts` for the new client (its funder, wrapped
/// adjudicator, handlers and timeouts).
pub async fn restart_opts(ledger: &Ledger, p: Party, opts: &Options) -> Party {
    restart_inner(ledger, p, None, opts).await
}

/// Like [`restart`], with `store` as the restarted client's store (it may
/// wrap the party's own, which stays open).
pub async fn restart_with(ledger: &Ledger, p: Party, store: Arc<dyn Persister>) -> Party {
    restart_inner(ledger, p, Some(store), &Options::default()).await
}

async fn restart_inner(
    ledger: &Ledger,
    p: Party,
    store: Option<Arc<dyn Persister>>,
    opts: &Options,
) -> Party {
    let Party {
        client,
        account,
        key,
        persister,
        dir,
        ..
    } = p;
    client.shutdown().await;
    drop(client);
    let persister = match (store, &dir) {
        (Some(store), _) => store,
        (None, Some(dir)) => {
            drop(persister);
            let path = dir.path().join("perun.redb");
            // The old client's tasks release the file as they notice the shutdown.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let store = loop {
                match RedbPersister::open(&path).await {
                    Ok(s) => break s,
                    Err(e) => {
                        assert!(std::time::Instant::now() < deadline, "reopen store: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            };
            Arc::new(store) as Arc<dyn Persister>
        }
        (None, None) => persister,
    };
    let (funder, adjudicator) = ledger.backends(&account).await;
    let funder = opts.funder.clone().unwrap_or(funder);
    let adjudicator = match &opts.wrap_adjudicator {
        Some(wrap) => wrap(adjudicator),
        None => adjudicator,
    };
    start(account, key, funder, adjudicator, persister, dir, opts).await
}

/// `n` parties that know each other's addresses.
pub async fn parties(ledger: &Ledger, n: usize, deposit: U256, opts: &Options) -> Vec<Party> {
    let mut ps = Vec::new();
    for _ in 0..n {
        ps.push(party(ledger, deposit, opts).await);
    }
    introduce(&ps).await;
    ps
}

/// Tells every party where every other one listens.
pub async fn introduce<P: std::borrow::Borrow<Party>>(ps: &[P]) {
    for a in ps.iter().map(|p| p.borrow()) {
        for b in ps.iter().map(|p| p.borrow()) {
            if a.client.peer_id() != b.client.peer_id() {
                for addr in b.client.listen_addrs().await.unwrap() {
                    a.client.add_peer(b.client.peer_id(), addr).await.unwrap();
                }
            }
        }
    }
}

/// A payment channel proposal between `ps` with `each` per participant.
pub fn proposal<P: std::borrow::Borrow<Party>>(
    ledger: &Ledger,
    ps: &[P],
    each: U256,
) -> ChannelProposal {
    ChannelProposal::payment(
        ps.iter().map(|p| p.borrow().participant()).collect(),
        Allocation::new(vec![ledger.asset()], vec![vec![each; ps.len()]]),
        60,
    )
}

/// Party 0 proposes; every other party accepts. Returns one `Channel` per party.
pub async fn open(ledger: &Ledger, ps: &mut [Party], each: U256) -> Vec<Channel> {
    let prop = proposal(ledger, ps, each);
    let (first, rest) = ps.split_first_mut().unwrap();
    let proposer = first.client.clone();
    let opening = tokio::spawn(async move { proposer.propose_channel(prop).await });
    let mut chans = Vec::new();
    for p in rest.iter_mut() {
        chans.push(p.accepted().await);
    }
    let mine = opening.await.unwrap().expect("proposal succeeds");
    chans.insert(0, mine);
    chans
}

/// Settles every channel (cooperatively: each side's `settle`) and checks
/// that each party's on-chain balance is what it kept off-chain (`kept`)
/// plus its share of the final state.
#[allow(dead_code)] // Not every test file settles this way.
pub async fn settle_all_and_check(ledger: &Ledger, ps: &[Party], chans: &[Channel], kept: U256) {
    caught_up(chans).await;
    for c in chans {
        c.settle().await.unwrap();
        assert_eq!(c.phase(), perun::channel::Phase::Withdrawn);
    }
    let fin = chans[0].state().state;
    assert!(fin.isFinal);
    for (i, p) in ps.iter().enumerate() {
        assert_eq!(
            ledger.balance(p.client.address()).await,
            kept + fin.outcome.balances[0][i],
            "{}: participant {i} on-chain balance equals the final state",
            ledger.name()
        );
    }
}

/// Waits until every channel holds the newest state any of them holds (a
/// peer stores a committed update right after its proposer returns), and
/// returns it.
pub async fn caught_up(chans: &[Channel]) -> perun::channel::SignedState {
    let newest = chans
        .iter()
        .map(|c| c.state().state.version)
        .max()
        .expect("some channel");
    for c in chans {
        c.wait_for_version(newest, Duration::from_secs(30))
            .await
            .expect("every party catches up");
    }
    let st = chans[0].state();
    for c in chans {
        assert_eq!(c.state(), st, "all parties hold the same state");
    }
    st
}

/// How long a test waits for something the chain or a peer should do.
pub const WAIT: Duration = Duration::from_secs(60);

/// Waits for the next `Registered` event with `version`.
pub async fn registered(events: &mut perun::client::EventStream, version: u64) {
    use perun::adjudicator::AdjudicatorEvent;
    use perun::client::ChannelEvent;
    tokio::time::timeout(WAIT, async {
        loop {
            if let Some(ChannelEvent::Chain(AdjudicatorEvent::Registered { version: v, .. })) =
                events.next().await
                && v == version
            {
                return;
            }
        }
    })
    .await
    .expect("registration seen in time");
}

/// Waits until the chain's dispute holds `version`.
pub async fn on_chain_version(adj: &Arc<dyn Adjudicator>, ch: &Channel, version: u64) {
    tokio::time::timeout(WAIT, async {
        loop {
            if adj
                .dispute(ch.id())
                .await
                .unwrap()
                .is_some_and(|d| d.version == version)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("dispute reaches the version in time");
}

/// Bob, gone rogue, registers `old` directly through his own chain backend.
pub async fn bob_registers(
    ledger: &Ledger,
    p: &Party,
    ch: &Channel,
    old: perun::channel::SignedState,
) -> Arc<dyn Adjudicator> {
    let (_, adj) = ledger.backends(&p.account).await;
    adj.register(&perun::adjudicator::SignedChannel {
        params: ch.params().clone(),
        state: old,
    })
    .await
    .unwrap();
    adj
}

/// Bob (participant 1) withdraws what the concluded channel owes him.
pub async fn bob_withdraws(
    adj: &Arc<dyn Adjudicator>,
    p: &Party,
    ch: &Channel,
    state: &perun::channel::SignedState,
) {
    adj.withdraw(&perun::adjudicator::WithdrawRequest {
        params: ch.params().clone(),
        state: state.state.clone(),
        index: 1,
        account: p.account.clone(),
        receiver: p.account.address(),
    })
    .await
    .unwrap();
}

/// One scenario of a `harness = false` test program.
pub type Scenario = fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

/// Runs the scenarios whose name contains the program's first argument (all
/// without one), each within `limit`, prints one line each and a libtest-like
/// summary, and exits 1 if any failed.
pub fn run_scenarios(
    rt: &tokio::runtime::Runtime,
    label: &str,
    scenarios: &[(&str, Scenario)],
    limit: Duration,
) {
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let (mut passed, mut failed) = (0, 0);
    for (name, run) in scenarios {
        if filter.as_deref().is_some_and(|f| !name.contains(f)) {
            continue;
        }
        println!("{label} {name} ...");
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            rt.block_on(async {
                tokio::time::timeout(limit, run())
                    .await
                    .expect("scenario finishes in time")
            })
        }));
        match res {
            Ok(()) => {
                passed += 1;
                println!("{label} {name} ... ok");
            }
            Err(_) => {
                failed += 1;
                println!("{label} {name} ... FAILED");
            }
        }
    }
    println!(
        "test result: {}. {passed} passed; {failed} failed",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    if failed > 0 {
        std::process::exit(1);
    }
}

/// The environment variables a child process of a test program reads its
/// chain from ([`deployment_from_env`]).
pub fn deployment_vars(d: &Deployment, anvil: &Anvil) -> Vec<(&'static str, String)> {
    vec![
        ("ADJ", d.adjudicator.to_string()),
        ("ETH_HOLDER", d.eth_holder.to_string()),
        ("TOKEN", d.token.to_string()),
        ("ERC20_HOLDER", d.erc20_holder.to_string()),
        ("DEPLOY_BLOCK", d.block.to_string()),
        ("ANVIL_URL", anvil.ws_url()),
    ]
}

/// A child process's chain, from [`deployment_vars`]: the deployment and the node's URL.
pub fn deployment_from_env() -> (Deployment, String) {
    let env = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let d = Deployment {
        adjudicator: env("ADJ").parse().unwrap(),
        eth_holder: env("ETH_HOLDER").parse().unwrap(),
        token: env("TOKEN").parse().unwrap(),
        erc20_holder: env("ERC20_HOLDER").parse().unwrap(),
        block: env("DEPLOY_BLOCK").parse().unwrap(),
    };
    (d, env("ANVIL_URL"))
}

/// Params of a payment channel between `a` and `b` on a made-up chain
/// and adjudicator: for tests of the channel crate's machine alone.
pub fn two_party_params(a: &LocalAccount, b: &LocalAccount) -> perun::channel::Params {
    let domain = perun::channel::Domain {
        chain_id: U256::from(31337),
        adjudicator: Address::repeat_byte(0xad),
    };
    perun::channel::Params::payment(
        domain,
        60,
        U256::from(7),
        vec![a.address(), b.address()],
        vec![vec![U256::from(100), U256::from(100)]],
    )
}

/// The version-0 state of [`two_party_params`]' channels: 100 each.
pub fn initial(params: &perun::channel::Params) -> perun::channel::State {
    let asset = Asset {
        chainId: U256::from(31337),
        holder: Address::repeat_byte(0x10),
    };
    perun::channel::State::initial(
        params,
        Allocation::new(vec![asset], vec![vec![U256::from(100), U256::from(100)]]),
    )
}

/// How many writes a [`failing_writes`] store is still to fail (a test
/// arms it by storing a count), and how many it failed.
#[derive(Clone, Default)]
pub struct Failures {
    pub fails: Arc<std::sync::atomic::AtomicU32>,
    pub injected: Arc<std::sync::atomic::AtomicU32>,
    /// Once set, the writes the store picks never return (a hung disk).
    pub hangs: Arc<std::sync::atomic::AtomicBool>,
}

impl Failures {
    /// Fails the next `n` writes the store picks.
    pub fn arm(&self, n: u32) {
        self.fails.store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// From now on the writes the store picks hang: no answer, no error.
    pub fn hang(&self) {
        self.hangs.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Writes failed so far.
    pub fn injected(&self) -> u32 {
        self.injected.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Options whose store fails, once armed, the writes `pick` selects, as a
/// transient disk error would (`Error::Storage`); every other call goes
/// through.
pub fn failing_writes(pick: fn(&[Change]) -> bool) -> (Options, Failures) {
    let failures = Failures::default();
    let opts = Options {
        wrap_persister: Some(Box::new({
            let failures = failures.clone();
            move |inner| {
                Arc::new(FailWrites {
                    inner,
                    failures: failures.clone(),
                    pick,
                }) as Arc<dyn Persister>
            }
        })),
        ..Options::default()
    };
    (opts, failures)
}

struct FailWrites {
    inner: Arc<dyn Persister>,
    failures: Failures,
    pick: fn(&[Change]) -> bool,
}

#[async_trait::async_trait]
impl Persister for FailWrites {
    async fn channel_created(&self, ch: &ChannelRecord) -> perun::persistence::Result<()> {
        self.inner.channel_created(ch).await
    }
    async fn update(&self, id: ChannelId, changes: Vec<Change>) -> perun::persistence::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if (self.pick)(&changes) && self.failures.hangs.load(SeqCst) {
            std::future::pending::<()>().await;
        }
        if (self.pick)(&changes)
            && self
                .failures
                .fails
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            self.failures.injected.fetch_add(1, SeqCst);
            return Err(perun::persistence::Error::Storage(
                "injected failure".into(),
            ));
        }
        self.inner.update(id, changes).await
    }
    async fn channel_removed(&self, id: ChannelId) -> perun::persistence::Result<()> {
        self.inner.channel_removed(id).await
    }
    async fn channel_ids(&self) -> perun::persistence::Result<Vec<ChannelId>> {
        self.inner.channel_ids().await
    }
    async fn load(&self, id: ChannelId) -> perun::persistence::Result<Option<ChannelRecord>> {
        self.inner.load(id).await
    }
    async fn load_all(&self) -> perun::persistence::Result<Vec<ChannelRecord>> {
        self.inner.load_all().await
    }
}

/// Bob pays Alice 100 six times; returns the state after the first payment
/// (Bob's best stale state) and the latest one.
pub async fn stale_and_latest(
    chans: &[Channel],
) -> (perun::channel::SignedState, perun::channel::SignedState) {
    let bob = &chans[1];
    bob.pay(0, 0, U256::from(100)).await.unwrap();
    let stale = bob.state();
    for _ in 0..5 {
        bob.pay(0, 0, U256::from(100)).await.unwrap();
    }
    let latest = caught_up(chans).await;
    assert_eq!(latest.state.version, stale.state.version + 5);
    (stale, latest)
}
