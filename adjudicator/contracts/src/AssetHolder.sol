// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {IAssetHolder} from "./Channel.sol";

/// Holds one asset's deposits for every channel and pays out the outcomes
/// the adjudicator sets.
///
/// One slot per participant and channel: the low 255 bits are the amount
/// held for the participant, the top bit marks "outcome set". Payouts are
/// pushed when the outcome is set; a push that fails (a receiver that reverts
/// or needs more than the stipend) leaves the amount credited, to be pulled
/// with `withdraw`, so no participant can block the others.
abstract contract AssetHolder is IAssetHolder {
    /// A participant's authorisation to pay its credit in a channel to `receiver`.
    struct WithdrawalAuth {
        bytes32 channelId;
        address participant;
        address receiver;
        uint256 amount;
    }

    uint256 private constant SETTLED = 1 << 255;
    uint256 private constant AMOUNT = SETTLED - 1;

    /// The only contract allowed to set outcomes.
    address public immutable adjudicator;

    /// fundingId => amount | SETTLED flag.
    mapping(bytes32 => uint256) private _holdings;

    /// `amount` was deposited for `fundingId`.
    event Deposited(bytes32 indexed fundingId, uint256 amount);
    /// `amount` of the participant's credit in the channel was paid to `receiver`.
    event Withdrawn(bytes32 indexed channelId, address indexed participant, address receiver, uint256 amount);

    error NotAdjudicator();
    error Lengths();
    error AlreadySettled();
    error NotSettled();
    error Overflow();
    error WrongSigner();
    /// Paying `to` failed (a receiver that reverts, a token that refuses it).
    error PaymentFailed(address to);
    /// A deposit expected `expected` held for `fundingId`, but `held` is: another deposit for the
    /// same slot came first, and this one would overpay.
    error HoldingsChanged(bytes32 fundingId, uint256 expected, uint256 held);

    constructor(address adjudicator_) {
        adjudicator = adjudicator_;
    }

    /// keccak256(abi.encode(channelId, participant)).
    function fundingId(bytes32 channelId, address participant) public pure returns (bytes32 id) {
        assembly ("memory-safe") {
            mstore(0x00, channelId)
            mstore(0x20, participant)
            id := keccak256(0x00, 0x40)
        }
    }

    /// The amount held for `fid` and whether the channel's outcome is set.
    function holdings(bytes32 fid) external view returns (uint256 amount, bool settled) {
        uint256 h = _holdings[fid];
        return (h & AMOUNT, h & SETTLED != 0);
    }

    /// Deposits `amount` for `fid` if exactly `expectedHeld` is held for it now, so a deposit
    /// computed from a read of the holdings lands at most once: a retried or concurrent deposit for
    /// the same slot reverts with `HoldingsChanged` instead of overpaying. A deposit after the
    /// outcome is set stays withdrawable.
    function deposit(bytes32 fid, uint256 expectedHeld, uint256 amount) external payable {
        uint256 h = _holdings[fid];
        uint256 held = h & AMOUNT;
        if (held != expectedHeld) revert HoldingsChanged(fid, expectedHeld, held);
        if (held + amount > AMOUNT) revert Overflow();
        // Effects before taking the asset: a token that re-enters finds the new holdings.
        unchecked {
            _holdings[fid] = h + amount;
        }
        _receive(amount);
        emit Deposited(fid, amount);
    }

    /// Sets the channel's outcome and pushes it. If the channel is under-funded (deposits sum below
    /// the outcome sum) every participant gets back exactly what it deposited.
    function setOutcome(bytes32 channelId, address[] calldata participants, uint256[] calldata amounts)
        external
    {
        if (msg.sender != adjudicator) revert NotAdjudicator();
        uint256 n = participants.length;
        if (amounts.length != n) revert Lengths();
        bytes32[] memory fids = new bytes32[](n);
        uint256[] memory deposits = new uint256[](n);
        uint256 deposited;
        uint256 owed;
        // Effects before any payment: every slot is read, then settled and emptied at once, so a
        // participant listed twice finds its slot settled and the call reverts instead of
        // counting one deposit twice.
        for (uint256 i = 0; i < n; ++i) {
            bytes32 fid = fundingId(channelId, participants[i]);
            uint256 h = _holdings[fid];
            if (h & SETTLED != 0) revert AlreadySettled();
            _holdings[fid] = SETTLED;
            fids[i] = fid;
            deposits[i] = h;
            deposited += h;
            owed += amounts[i];
        }
        uint256[] memory pay = deposited < owed ? deposits : amounts;
        for (uint256 i = 0; i < n; ++i) {
            uint256 amount = pay[i];
            if (amount != 0 && !_tryPay(participants[i], amount)) {
                _holdings[fids[i]] = SETTLED | amount;
            }
        }
    }

    /// Pays the participant's credit (up to auth.amount) to auth.receiver. The participant calls it
    /// itself or signs the auth (EIP-191 over this holder, the chain id and the auth).
    function withdraw(WithdrawalAuth calldata auth, bytes calldata sig) external {
        if (msg.sender != auth.participant) {
            bytes32 digest = keccak256(abi.encode(address(this), block.chainid, auth));
            address signer = ECDSA.recoverCalldata(MessageHashUtils.toEthSignedMessageHash(digest), sig);
            if (signer != auth.participant) revert WrongSigner();
        }
        bytes32 fid = fundingId(auth.channelId, auth.participant);
        uint256 h = _holdings[fid];
        if (h & SETTLED == 0) revert NotSettled();
        uint256 credit = h & AMOUNT;
        uint256 amount = auth.amount < credit ? auth.amount : credit;
        if (amount == 0) return;
        _holdings[fid] = h - amount;
        _pay(auth.receiver, amount);
        emit Withdrawn(auth.channelId, auth.participant, auth.receiver, amount);
    }

    /// Takes `amount` of the asset from the caller.
    function _receive(uint256 amount) internal virtual;

    /// Pays `amount` to `to`, reverting on failure.
    function _pay(address to, uint256 amount) internal virtual;

    /// Tries to pay `amount` to `to` with bounded gas; false leaves it to a later withdraw.
    function _tryPay(address to, uint256 amount) internal virtual returns (bool);
}
