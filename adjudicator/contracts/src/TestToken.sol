// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// An ERC20 for tests and benchmarks: anyone may mint, and anyone may block an
/// address from receiving (as tokens with a block list do), to test that a
/// refused payout does not block the other participants.
contract TestToken is ERC20 {
    /// Addresses that cannot receive tokens.
    mapping(address => bool) public blocked;

    error Blocked(address to);

    constructor() ERC20("Perun Test Token", "PTT") {}

    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    function setBlocked(address who, bool isBlocked) external {
        blocked[who] = isBlocked;
    }

    function _update(address from, address to, uint256 value) internal override {
        if (blocked[to]) revert Blocked(to);
        super._update(from, to, value);
    }
}
