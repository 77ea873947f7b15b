// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {Params, State, IAssetHolder} from "./Channel.sol";

/// Resolves channel disputes: a registered state can be refuted by a newer
/// one until its timeout; afterwards (or at once for a fully signed final
/// state) the outcome is pushed to the asset holders.
///
/// Storage per channel is two slots: the packed dispute and the state hash.
contract Adjudicator {
    /// The on-chain dispute of a channel, packed into one slot.
    struct Dispute {
        uint64 version;
        uint64 timeout;
        bool concluded;
    }

    /// channelId => dispute (version, timeout, concluded).
    mapping(bytes32 => Dispute) public disputes;
    /// channelId => keccak256(abi.encode(registered state)); zero after a direct concludeFinal.
    mapping(bytes32 => bytes32) public stateHashes;

    /// A state was registered or refuted; carries the state so watchers can recover it.
    event Registered(bytes32 indexed channelId, uint64 version, uint64 timeout, State state);
    /// The channel's outcome was pushed to the asset holders.
    event Concluded(bytes32 indexed channelId, uint64 version);

    error WrongChannel();
    error Dimensions();
    error SignatureCount();
    error WrongSigner(uint256 index);
    error AlreadyConcluded();
    error TimeoutPassed();
    /// A refutation must carry a strictly higher version than the registered one.
    error VersionTooLow(uint64 registered, uint64 got);
    error NotRegistered();
    /// The dispute can be concluded at `timeout`; the block's time is `now`.
    error TimeoutNotPassed(uint64 timeout, uint64 now);
    error WrongState();
    error NotFinal();

    /// keccak256(abi.encode(params)).
    function channelId(Params calldata params) public pure returns (bytes32) {
        return keccak256(abi.encode(params));
    }

    /// keccak256(abi.encode(state)): what participants sign (EIP-191 wrapped).
    function hashState(State calldata state) public pure returns (bytes32) {
        return keccak256(abi.encode(state));
    }

    /// Registers a fully signed state, or refutes the registered one with a strictly newer version
    /// before its timeout. A final state gets a timeout of now: nothing can follow it.
    function register(Params calldata params, State calldata state, bytes[] calldata sigs) external {
        bytes32 id = _checkState(params, state);
        bytes32 h = _checkSigs(params, state, sigs);
        Dispute memory d = disputes[id];
        if (d.timeout == 0) {
            d.timeout = state.isFinal ? uint64(block.timestamp) : uint64(block.timestamp) + params.challengeDuration;
        } else {
            if (d.concluded) revert AlreadyConcluded();
            if (block.timestamp >= d.timeout) revert TimeoutPassed();
            if (state.version <= d.version) revert VersionTooLow(d.version, state.version);
            if (state.isFinal) d.timeout = uint64(block.timestamp);
        }
        d.version = state.version;
        disputes[id] = d;
        stateHashes[id] = h;
        emit Registered(id, state.version, d.timeout, state);
    }

    /// Concludes the registered state after its timeout and pushes its outcome.
    function conclude(Params calldata params, State calldata state) external {
        bytes32 id = _checkState(params, state);
        Dispute memory d = disputes[id];
        if (d.timeout == 0) revert NotRegistered();
        if (d.concluded) revert AlreadyConcluded();
        if (block.timestamp < d.timeout) revert TimeoutNotPassed(d.timeout, uint64(block.timestamp));
        if (keccak256(abi.encode(state)) != stateHashes[id]) revert WrongState();
        d.concluded = true;
        disputes[id] = d;
        _pushOutcome(id, params, state);
        emit Concluded(id, state.version);
    }

    /// Cooperative close: concludes a fully signed final state at once and pushes its outcome.
    function concludeFinal(Params calldata params, State calldata state, bytes[] calldata sigs) external {
        if (!state.isFinal) revert NotFinal();
        bytes32 id = _checkState(params, state);
        _checkSigs(params, state, sigs);
        if (disputes[id].concluded) revert AlreadyConcluded();
        disputes[id] = Dispute({version: state.version, timeout: uint64(block.timestamp), concluded: true});
        _pushOutcome(id, params, state);
        emit Concluded(id, state.version);
    }

    /// Checks that the state belongs to the params and has one balance per asset and participant.
    function _checkState(Params calldata params, State calldata state) private pure returns (bytes32 id) {
        id = keccak256(abi.encode(params));
        if (state.channelId != id) revert WrongChannel();
        uint256 n = params.participants.length;
        uint256 a = state.outcome.assets.length;
        if (a == 0 || state.outcome.balances.length != a) revert Dimensions();
        for (uint256 i = 0; i < a; ++i) {
            if (state.outcome.balances[i].length != n) revert Dimensions();
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

    /// Hands each same-chain asset's balances to its holder; assets of other chains are not ours to settle.
    function _pushOutcome(bytes32 id, Params calldata params, State calldata state) private {
        uint256 a = state.outcome.assets.length;
        for (uint256 i = 0; i < a; ++i) {
            if (state.outcome.assets[i].chainId != block.chainid) continue;
            IAssetHolder(state.outcome.assets[i].holder).setOutcome(
                id, params.participants, state.outcome.balances[i]
            );
        }
    }
}
