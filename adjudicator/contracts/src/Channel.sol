// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

/// The fixed parameters of a channel; channelId = keccak256(abi.encode(params)).
/// `chainId` and `adjudicator` bind the channel (and so every state's signature) to one
/// deployment on one chain; `funding[asset][participant]` is what each participant deposits.
struct Params {
    uint64 challengeDuration;
    uint256 nonce;
    address[] participants;
    address app;
    uint256 chainId;
    address adjudicator;
    uint256[][] funding;
}

/// A token on some chain, held by an asset holder contract.
struct Asset {
    uint256 chainId;
    address holder;
}

/// Who gets what: balances[asset][participant].
struct Allocation {
    Asset[] assets;
    uint256[][] balances;
}

/// One version of a channel's off-chain state; signed EIP-191 over keccak256(abi.encode(state)).
struct State {
    bytes32 channelId;
    uint64 version;
    Allocation outcome;
    bytes appData;
    bool isFinal;
}

/// What an asset holder accepts from the adjudicator.
interface IAssetHolder {
    function setOutcome(
        bytes32 channelId,
        address[] calldata participants,
        uint256[] calldata funding,
        uint256[] calldata amounts
    ) external;
}
