// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

/// Test contracts: a token that calls the recipient back on transfer, and a hook that uses the
/// call to re-enter a holder (tests/reentry.rs).

interface IHook { function tokensReceived(address from, address to, uint256 amount) external; }

/// An ERC20 that calls the recipient's registered hook on every transfer (as ERC777 does
/// through ERC1820).
contract HookToken {
    mapping(address => uint256) public balanceOf;
    mapping(address => mapping(address => uint256)) public allowance;
    mapping(address => address) public hookOf;
    function mint(address to, uint256 a) external { balanceOf[to] += a; }
    function approve(address s, uint256 a) external returns (bool) { allowance[msg.sender][s] = a; return true; }
    function setHook(address h) external { hookOf[msg.sender] = h; }
    function transfer(address to, uint256 a) external returns (bool) { _move(msg.sender, to, a); return true; }
    function transferFrom(address f, address to, uint256 a) external returns (bool) {
        allowance[f][msg.sender] -= a; _move(f, to, a); return true;
    }
    function _move(address f, address to, uint256 a) internal {
        balanceOf[f] -= a; balanceOf[to] += a;
        address h = hookOf[to];
        if (h != address(0)) IHook(h).tokensReceived(f, to, a);
    }
}

struct Auth { bytes32 channelId; address participant; address receiver; uint256 amount; uint256 nonce; }
interface IWithdraw { function withdraw(Auth calldata auth, bytes calldata sig) external; }

/// Alice's hook: on receiving the token it withdraws her ether slot with a pre-signed auth.
contract ReentryHook {
    address immutable holder; bytes32 immutable cid; address immutable who; bytes32 immutable r; bytes32 immutable s; uint8 immutable v;
    constructor(address h, bytes32 c, address w, bytes32 r_, bytes32 s_, uint8 v_) { holder = h; cid = c; who = w; r = r_; s = s_; v = v_; }
    function tokensReceived(address, address, uint256) external {
        IWithdraw(holder).withdraw(Auth(cid, who, who, type(uint256).max, 0), abi.encodePacked(r, s, v));
    }
}
