// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {Params, State} from "./Channel.sol";

/// The rules of an app channel, as the adjudicator enforces them in a dispute.
///
/// The adjudicator checks the generic rule first (same channel, newer version, same
/// assets and per-asset sums, the actor's signature); the app decides the rest.
interface IApp {
    /// Returns if `actor` may move the channel from `from` to `to`; reverts with a custom
    /// error naming the reason otherwise (the adjudicator passes that revert on unchanged).
    function validTransition(Params calldata params, State calldata from, State calldata to, uint256 actor)
        external
        view;
}
