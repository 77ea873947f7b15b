// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {TransientSlot} from "@openzeppelin/contracts/utils/TransientSlot.sol";
import {AssetHolder} from "./AssetHolder.sol";

/// Holds one ERC20 token.
contract AssetHolderERC20 is AssetHolder {
    using SafeERC20 for IERC20;
    using TransientSlot for *;

    /// The token this holder holds.
    IERC20 public immutable token;

    /// Gas a pushed token transfer may use.
    uint256 private constant PUSH_GAS = 100_000;
    /// Transient slot of the re-entry guard.
    bytes32 private constant LOCK = keccak256("perun.AssetHolderERC20.lock");

    error NoEther();
    error PushGas();
    /// The token called back into deposit or withdraw.
    error Reentered();

    constructor(address adjudicator_, IERC20 token_) AssetHolder(adjudicator_) {
        token = token_;
    }

    /// Credits what arrived (balance before and after), so a token that charges a fee on
    /// transfer is credited with what the holder actually got.
    function _receive(uint256 amount) internal override returns (uint256) {
        if (msg.value != 0) revert NoEther();
        uint256 before = token.balanceOf(address(this));
        token.safeTransferFrom(msg.sender, address(this), amount);
        return token.balanceOf(address(this)) - before;
    }

    function _pay(address to, uint256 amount) internal override {
        if (!token.trySafeTransfer(to, amount)) revert PaymentFailed(to);
    }

    /// A token that refuses the receiver (a block list, say) leaves the amount credited. The push gets
    /// a fixed gas budget, and a transaction with too little gas for it reverts rather than
    /// silently turning a payment into a credit.
    function _tryPay(address to, uint256 amount) internal override returns (bool) {
        if (gasleft() < PUSH_GAS + PUSH_GAS / 63 + 5_000) revert PushGas();
        bytes memory data = abi.encodeCall(IERC20.transfer, (to, amount));
        address t = address(token);
        bool ok;
        uint256 size;
        uint256 word;
        // At most one word of return data is copied: a token cannot make the close pay for a
        // huge return buffer.
        assembly ("memory-safe") {
            ok := call(PUSH_GAS, t, 0, add(data, 0x20), mload(data), 0x00, 0x20)
            size := returndatasize()
            word := mload(0x00)
        }
        if (!ok) return false;
        if (size == 0) return t.code.length > 0;
        return size == 32 && word == 1;
    }

    /// The deposit credits after the token moved, so the token must not get in between.
    function _enter() internal override {
        if (LOCK.asBoolean().tload()) revert Reentered();
        LOCK.asBoolean().tstore(true);
    }

    function _exit() internal override {
        LOCK.asBoolean().tstore(false);
    }
}
