// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {Params, State, IAssetHolder} from "./Channel.sol";
import {IApp} from "./IApp.sol";

/// Resolves channel disputes: a registered state can be refuted by a newer
/// one until its timeout; afterwards (or at once for a fully signed final
/// state) the outcome is pushed to the asset holders.
///
/// In an app channel (`params.app != 0`) the registered state can then be
/// progressed, one move at a time, by states signed only by their actor and
/// checked by the app (`IApp.validTransition`); each progression restarts the
/// timeout, and the last one concludes. Payment channels cannot be progressed.
///
/// Storage per channel is two slots: the packed dispute and the state hash.
contract Adjudicator {
    /// The on-chain dispute of a channel, packed into one slot.
    struct Dispute {
        uint64 version;
        uint64 timeout;
        /// OPEN, CONCLUDED or PROGRESSED. One byte rather than two flags (and not an enum,
        /// whose range checks cost every call): payment channels pay nothing for it.
        uint8 phase;
    }

    /// Registered (or refuted): refutable until the timeout.
    uint8 private constant OPEN = 0;
    /// The outcome was pushed.
    uint8 private constant CONCLUDED = 1;
    /// An app channel's dispute moved on by `progress`: registration is over.
    uint8 private constant PROGRESSED = 2;

    /// The shortest challenge duration: a dispute must leave time to refute.
    uint64 public constant MIN_CHALLENGE = 1;
    /// The longest challenge duration: deposits must not be locked for ever.
    uint64 public constant MAX_CHALLENGE = 365 days;
    /// Gas a holder's `adjudicator()` may use when the outcome is pushed.
    uint256 private constant BIND_GAS = 5_000;

    /// channelId => dispute (version, timeout, phase).
    mapping(bytes32 => Dispute) public disputes;
    /// channelId => keccak256(abi.encode(registered state)); zero after a direct concludeFinal.
    mapping(bytes32 => bytes32) public stateHashes;
    /// The channel whose outcome is being pushed, for the length of the push (transient).
    bytes32 private transient _pushing;

    /// A state was registered or refuted; carries the state so watchers can recover it, and the
    /// params' nonce, so a watchtower learns it (with the channel id) from the logs alone.
    event Registered(bytes32 indexed channelId, uint64 version, uint64 timeout, uint256 nonce, State state);
    /// An app channel's registered state was progressed by `actor`'s move to `state`, which
    /// concludes at `timeout` unless progressed again before.
    event Progressed(bytes32 indexed channelId, uint64 version, uint64 timeout, uint64 actor, State state);
    /// The channel's outcome was pushed to the asset holders.
    event Concluded(bytes32 indexed channelId, uint64 version);
    /// An asset's holder was not settled: it has no code, is bound to another adjudicator, or
    /// is listed twice. The channel's other assets are settled regardless.
    event OutcomeSkipped(bytes32 indexed channelId, address holder);

    error WrongChannel();
    error Dimensions();
    error SignatureCount();
    error WrongSigner(uint256 index);
    error AlreadyConcluded();
    error TimeoutPassed();
    /// A refutation (or a final state) must not carry a lower version than the registered one.
    error VersionTooLow(uint64 registered, uint64 got);
    /// The app refused the move; `reason` is its revert data (its custom error).
    error AppRejected(bytes reason);
    /// A progression must carry the registered version + 1.
    error VersionStep(uint64 registered, uint64 got);
    error NotRegistered();
    /// The dispute can be concluded at `timeout`; the block's time is `now`.
    error TimeoutNotPassed(uint64 timeout, uint64 now);
    error WrongState();
    error NotFinal();
    /// The params name another chain or another adjudicator deployment.
    error WrongDomain(uint256 chainId, address adjudicator);
    /// Participant `index` is listed before too.
    error DuplicateParticipant(uint256 index);
    /// Asset `index` is on another chain: a channel settles all its assets on its adjudicator's chain.
    error ForeignAsset(uint256 index, uint256 chainId);
    /// The challenge duration is outside [MIN_CHALLENGE, MAX_CHALLENGE].
    error ChallengeDuration(uint64 got);
    /// Too little gas left to check a holder: the check must not fail for want of gas.
    error HolderCheckGas();
    /// `progress` in a payment channel (`params.app == 0`).
    error NoApp();
    /// A registration after the dispute was progressed: only `progress` moves it on.
    error AlreadyProgressed();
    /// `progress` from a final state: nothing follows it.
    error FinalState();
    /// The actor is not a participant index.
    error BadActor(uint256 actor);
    /// A progression changed the set or order of assets.
    error AssetsChanged();
    /// A progression changed the sum of asset `index`'s balances.
    error SumChanged(uint256 index);

    /// Whether the channel's outcome is set at every holder: concluded, and not in the middle of
    /// the push. Holders pay credits only then, so a payout that calls back (a token's hook)
    /// cannot withdraw from a holder whose outcome is still to be set.
    function settled(bytes32 channelId_) external view returns (bool) {
        return disputes[channelId_].phase == CONCLUDED && _pushing != channelId_;
    }

    /// keccak256(abi.encode(params)).
    function channelId(Params calldata params) public pure returns (bytes32) {
        return keccak256(abi.encode(params));
    }

    /// keccak256(abi.encode(state)): what participants sign (EIP-191 wrapped).
    function hashState(State calldata state) public pure returns (bytes32) {
        return keccak256(abi.encode(state));
    }

    /// Registers a fully signed state, or refutes the registered one with a strictly newer version
    /// before its timeout. A final state gets a timeout of now: nothing can follow it. The state
    /// registered already is a no-op.
    function register(Params calldata params, State calldata state, bytes[] calldata sigs) external {
        bytes32 id = _checkState(params, state);
        bytes32 h = _checkSigs(params, state, sigs);
        Dispute memory d = disputes[id];
        if (d.timeout == 0) {
            d.timeout = state.isFinal ? uint64(block.timestamp) : uint64(block.timestamp) + params.challengeDuration;
        } else {
            if (d.phase != OPEN) {
                if (d.phase == CONCLUDED) revert AlreadyConcluded();
                revert AlreadyProgressed();
            }
            if (state.version == d.version && stateHashes[id] == h) return;
            if (block.timestamp >= d.timeout) revert TimeoutPassed();
            if (state.version <= d.version) revert VersionTooLow(d.version, state.version);
            if (state.isFinal) d.timeout = uint64(block.timestamp);
        }
        d.version = state.version;
        disputes[id] = d;
        stateHashes[id] = h;
        emit Registered(id, state.version, d.timeout, params.nonce, state);
    }

    /// Advances an app channel's dispute by one move: `to`, signed by `actor` alone, follows the
    /// registered state `from` by the app's rules. The first progression may come once the
    /// refutation period is over (and ends registration); each one restarts the timeout, and
    /// the next must come before it. `to` final concludes at once (timeout now).
    function progress(Params calldata params, State calldata from, State calldata to, uint256 actor, bytes calldata sig)
        external
    {
        // The params were checked when the dispute was registered (same params, same id); of
        // `to`, its channel here and its dimensions and assets in `_checkSums`.
        bytes32 id = keccak256(abi.encode(params));
        if (to.channelId != id) revert WrongChannel();
        if (params.app == address(0)) revert NoApp();
        Dispute memory d = disputes[id];
        if (d.timeout == 0) revert NotRegistered();
        if (d.phase == CONCLUDED) revert AlreadyConcluded();
        if (keccak256(abi.encode(from)) != stateHashes[id]) revert WrongState();
        if (d.phase == OPEN) {
            if (block.timestamp < d.timeout) revert TimeoutNotPassed(d.timeout, uint64(block.timestamp));
            // The first move has the same deadline as any other: once the registered state can
            // be concluded, a late mover must not take the pot from under the conclusion.
            if (block.timestamp >= d.timeout + params.challengeDuration) revert TimeoutPassed();
        } else if (block.timestamp >= d.timeout) {
            revert TimeoutPassed();
        }
        if (from.isFinal) revert FinalState();
        // Exactly one version per move: a jump (to 2^64 - 1, say) would leave no version
        // for the answer, and the mover would win by timeout.
        if (to.version != from.version + 1) revert VersionStep(from.version, to.version);
        uint256 n = params.participants.length;
        if (actor >= n) revert BadActor(actor);
        bytes32 h = keccak256(abi.encode(to));
        (address signer, ECDSA.RecoverError err,) =
            ECDSA.tryRecoverCalldata(MessageHashUtils.toEthSignedMessageHash(h), sig);
        if (err != ECDSA.RecoverError.NoError || signer != params.participants[actor]) revert WrongSigner(actor);
        _checkSums(from, to);
        // The app's verdict is wrapped, so an app cannot pass for the adjudicator by reverting
        // with one of its errors (`WrongState`, `TimeoutPassed`, ...).
        try IApp(params.app).validTransition(params, from, to, actor) {}
        catch (bytes memory reason) {
            revert AppRejected(reason);
        }
        d.version = to.version;
        d.phase = PROGRESSED;
        d.timeout = to.isFinal ? uint64(block.timestamp) : uint64(block.timestamp) + params.challengeDuration;
        disputes[id] = d;
        stateHashes[id] = h;
        emit Progressed(id, to.version, d.timeout, uint64(actor), to);
    }

    /// Concludes the registered state after its timeout and pushes its outcome. An app channel
    /// whose dispute was never progressed (and whose state is not final) waits a second
    /// challenge duration: the window for the first progression.
    function conclude(Params calldata params, State calldata state) external {
        bytes32 id = _checkState(params, state);
        Dispute memory d = disputes[id];
        if (d.timeout == 0) revert NotRegistered();
        if (d.phase == CONCLUDED) revert AlreadyConcluded();
        if (block.timestamp < d.timeout) revert TimeoutNotPassed(d.timeout, uint64(block.timestamp));
        _appWindow(params, state, d);
        if (keccak256(abi.encode(state)) != stateHashes[id]) revert WrongState();
        d.phase = CONCLUDED;
        disputes[id] = d;
        _pushOutcome(id, params, state);
        emit Concluded(id, state.version);
    }

    /// An app channel whose dispute was never progressed (and whose state is not final)
    /// concludes a challenge duration after the timeout: the window for the first move.
    function _appWindow(Params calldata params, State calldata state, Dispute memory d) private view {
        uint256 app;
        assembly ("memory-safe") {
            app := calldataload(add(params, 0x60))
        }
        if (app != 0 && d.phase == OPEN && !state.isFinal) {
            uint64 t = d.timeout + params.challengeDuration;
            if (block.timestamp < t) revert TimeoutNotPassed(t, uint64(block.timestamp));
        }
    }

    /// Cooperative close: concludes a fully signed final state at once and pushes its outcome.
    /// A registered newer version wins: an old final state cannot override it.
    function concludeFinal(Params calldata params, State calldata state, bytes[] calldata sigs) external {
        if (!state.isFinal) revert NotFinal();
        bytes32 id = _checkState(params, state);
        _checkSigs(params, state, sigs);
        Dispute memory d = disputes[id];
        if (d.phase == CONCLUDED) revert AlreadyConcluded();
        if (d.version > state.version) revert VersionTooLow(d.version, state.version);
        disputes[id] = Dispute({version: state.version, timeout: uint64(block.timestamp), phase: CONCLUDED});
        _pushOutcome(id, params, state);
        emit Concluded(id, state.version);
    }

    /// Checks the params' domain, participants and challenge duration, that the state belongs to
    /// the params, and that balances and funding have one entry per asset and participant.
    function _checkState(Params calldata params, State calldata state) private view returns (bytes32 id) {
        if (params.chainId != block.chainid || params.adjudicator != address(this)) {
            revert WrongDomain(params.chainId, params.adjudicator);
        }
        uint64 cd = params.challengeDuration;
        if (cd < MIN_CHALLENGE || cd > MAX_CHALLENGE) revert ChallengeDuration(cd);
        id = keccak256(abi.encode(params));
        if (state.channelId != id) revert WrongChannel();
        address[] calldata ps = params.participants;
        uint256 n = ps.length;
        for (uint256 i = 1; i < n; ++i) {
            address p = ps[i];
            for (uint256 j = 0; j < i; ++j) {
                if (ps[j] == p) revert DuplicateParticipant(i);
            }
        }
        uint256 a = state.outcome.assets.length;
        if (a == 0 || state.outcome.balances.length != a || params.funding.length != a) revert Dimensions();
        for (uint256 i = 0; i < a; ++i) {
            if (state.outcome.balances[i].length != n || params.funding[i].length != n) revert Dimensions();
            uint256 chain = state.outcome.assets[i].chainId;
            if (chain != block.chainid) revert ForeignAsset(i, chain);
        }
    }

    /// A progression keeps the assets (in order) and each asset's sum of balances, with one
    /// balance per asset and participant (`Dimensions`); `from` is the registered state, so its
    /// dimensions and assets were checked when it was registered.
    function _checkSums(State calldata from, State calldata to) private pure {
        uint256 a = from.outcome.assets.length;
        if (to.outcome.assets.length != a) revert AssetsChanged();
        if (to.outcome.balances.length != a) revert Dimensions();
        for (uint256 i = 0; i < a; ++i) {
            if (
                to.outcome.assets[i].chainId != from.outcome.assets[i].chainId
                    || to.outcome.assets[i].holder != from.outcome.assets[i].holder
            ) revert AssetsChanged();
            uint256[] calldata x = from.outcome.balances[i];
            uint256[] calldata y = to.outcome.balances[i];
            if (y.length != x.length) revert Dimensions();
            uint256 sx = 0;
            uint256 sy = 0;
            for (uint256 p = 0; p < x.length; ++p) {
                sx += x[p];
                sy += y[p];
            }
            if (sx != sy) revert SumChanged(i);
        }
    }

    /// Checks that participant i signed the state in sigs[i]. A signature that does not parse
    /// (wrong length, high s, bad v) is as wrong as one by someone else: `WrongSigner(i)` names it.
    function _checkSigs(Params calldata params, State calldata state, bytes[] calldata sigs)
        private
        pure
        returns (bytes32 h)
    {
        h = keccak256(abi.encode(state));
        uint256 n = params.participants.length;
        if (sigs.length != n) revert SignatureCount();
        bytes32 digest = MessageHashUtils.toEthSignedMessageHash(h);
        for (uint256 i = 0; i < n; ++i) {
            (address signer, ECDSA.RecoverError err,) = ECDSA.tryRecoverCalldata(digest, sigs[i]);
            if (err != ECDSA.RecoverError.NoError || signer != params.participants[i]) revert WrongSigner(i);
        }
    }

    /// Hands each asset's balances (and funding) to its holder. A holder that is not one of
    /// ours, or is listed a second time, is skipped (`OutcomeSkipped`) rather than reverting, so
    /// it cannot lock the other assets. While the push runs, `settled` says no.
    function _pushOutcome(bytes32 id, Params calldata params, State calldata state) private {
        _pushing = id;
        uint256 a = state.outcome.assets.length;
        for (uint256 i = 0; i < a; ++i) {
            address holder = state.outcome.assets[i].holder;
            if (!_bound(holder) || _listedBefore(state, i, holder)) {
                emit OutcomeSkipped(id, holder);
                continue;
            }
            IAssetHolder(holder).setOutcome(id, params.participants, params.funding[i], state.outcome.balances[i]);
        }
        _pushing = bytes32(0);
    }

    /// Whether `holder` has code whose `adjudicator()` is this contract. A failing or
    /// gas-hungry call is "no"; the call gets a fixed budget, and too little gas for it reverts
    /// (a caller must not make one of our holders look foreign by starving it).
    function _bound(address holder) private view returns (bool ok) {
        if (gasleft() < BIND_GAS + BIND_GAS / 63 + 5_000) revert HolderCheckGas();
        bytes4 sel = IAssetHolderBinding.adjudicator.selector;
        assembly ("memory-safe") {
            mstore(0x00, sel)
            let success := staticcall(BIND_GAS, holder, 0x00, 0x04, 0x00, 0x20)
            ok := and(success, and(eq(returndatasize(), 0x20), eq(mload(0x00), address())))
        }
    }

    /// Whether asset `i`'s holder on this chain appeared at an earlier index.
    function _listedBefore(State calldata state, uint256 i, address holder) private pure returns (bool) {
        for (uint256 j = 0; j < i; ++j) {
            if (state.outcome.assets[j].holder == holder) {
                return true;
            }
        }
        return false;
    }
}

/// The holders' binding to their adjudicator.
interface IAssetHolderBinding {
    function adjudicator() external view returns (address);
}
