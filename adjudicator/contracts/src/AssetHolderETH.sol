// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {AssetHolder} from "./AssetHolder.sol";

/// Holds ether.
contract AssetHolderETH is AssetHolder {
    error WrongValue();

    constructor(address adjudicator_) AssetHolder(adjudicator_) {}

    /// `deposit` of the ether sent (`amount = msg.value`): one calldata word and one check less,
    /// for the call every participant of every channel makes.
    function depositEth(bytes32 channelId, address participant, uint256 expectedHeld) external payable {
        _book(channelId, participant, expectedHeld, msg.value);
    }

    /// Ether arrives whole, and taking it calls nobody: no re-entry guard is needed.
    function _receive(uint256 amount) internal override returns (uint256) {
        if (msg.value != amount) revert WrongValue();
        return amount;
    }

    function _pay(address to, uint256 amount) internal override {
        (bool ok,) = payable(to).call{value: amount}("");
        if (!ok) revert PaymentFailed(to);
    }

    /// The 2300-gas stipend only: a receiver cannot re-enter with state changes or burn the caller's gas.
    function _tryPay(address to, uint256 amount) internal override returns (bool ok) {
        assembly ("memory-safe") {
            ok := call(0, to, amount, 0, 0, 0, 0)
        }
    }
}
