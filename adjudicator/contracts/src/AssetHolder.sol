// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {IAssetHolder} from "./Channel.sol";

/// The adjudicator's view of a channel that the holders rely on.
interface ISettled {
    function settled(bytes32 channelId) external view returns (bool);
}

/// Holds one asset's deposits for every channel and pays out the outcomes
/// the adjudicator sets.
///
/// One slot per participant and channel, holding the amount deposited for
/// (or, once the channel is concluded, credited to) the participant. When
/// the outcome is set, every slot of the channel is emptied (a refund of
/// storage gas) and its payout pushed; a push that fails (a receiver that
/// reverts or needs more than the stipend) is credited back to the slot, to
/// be pulled with `withdraw`, so no participant can block the others.
/// Whether a channel is settled is the adjudicator's `settled`: concluded,
/// and not in the middle of pushing the outcome (it sets each holder's
/// outcome exactly once, in the transaction that concludes).
abstract contract AssetHolder is IAssetHolder {
    /// A participant's authorisation to pay its credit in a channel to `receiver`. `nonce` must be
    /// the participant's `withdrawNonces` entry, so each authorisation is used at most once.
    struct WithdrawalAuth {
        bytes32 channelId;
        address participant;
        address receiver;
        uint256 amount;
        uint256 nonce;
    }

    /// The only contract allowed to set outcomes.
    address public immutable adjudicator;

    // The amount held for (channel, participant) is stored at the storage slot
    // keccak256(channelId ‖ participant ‖ HOLDINGS): one hash per access instead of a mapping's
    // two. Its 96-byte preimage has no other variable's shape (a mapping's slots hash 64
    // bytes), so no deposit can write another variable. See `_slot`.
    bytes32 private constant HOLDINGS = keccak256("perun.AssetHolder.holdings");
    /// participant => the nonce its next signed withdrawal authorisation must carry.
    mapping(address => uint256) public withdrawNonces;

    /// `amount` arrived for the participant in the channel (before or after the channel is
    /// concluded: after, it is withdrawable at once).
    event Deposited(bytes32 indexed channelId, address participant, uint256 amount);
    /// The channel's outcome was set at this holder (its payouts follow as `Paid` or `Credited`).
    event OutcomeSet(bytes32 indexed channelId);
    /// `amount` of the channel's outcome was pushed to the participant.
    event Paid(bytes32 indexed channelId, address participant, uint256 amount);
    /// `amount` of the channel's outcome was credited to the participant, to be pulled with
    /// `withdraw` (its push failed).
    event Credited(bytes32 indexed channelId, address indexed participant, uint256 amount);
    /// `amount` of the participant's credit in the channel was paid to `receiver`.
    event Withdrawn(bytes32 indexed channelId, address indexed participant, address receiver, uint256 amount);

    error NotAdjudicator();
    error Lengths();
    error NotSettled();
    error Overflow();
    error WrongSigner();
    /// A signed authorisation must carry the participant's current `withdrawNonces` entry.
    error WrongNonce(uint256 expected, uint256 got);
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

    /// The amount held for the participant in the channel, and whether the channel is concluded
    /// (then the amount is the participant's withdrawable credit).
    function holdings(bytes32 channelId, address participant) external view returns (uint256 amount, bool settled) {
        return (_held(_slot(channelId, participant)), _concluded(channelId));
    }

    /// Deposits `amount` for the participant if exactly `expectedHeld` is held for it now, so a
    /// deposit computed from a read of the holdings lands at most once: a retried or concurrent
    /// deposit for the same slot reverts with `HoldingsChanged` instead of overpaying. What
    /// arrives is credited (less than `amount` for a token that charges a fee). A deposit after
    /// the channel is concluded is withdrawable at once.
    function deposit(bytes32 channelId, address participant, uint256 expectedHeld, uint256 amount)
        external
        payable
    {
        _enter();
        _book(channelId, participant, expectedHeld, _receive(amount));
        _exit();
    }

    /// Adds `arrived` to the participant's slot if it holds `expectedHeld` (the asset has
    /// arrived already: a revert here undoes that too).
    function _book(bytes32 channelId, address participant, uint256 expectedHeld, uint256 arrived) internal {
        bytes32 slot = _slot(channelId, participant);
        uint256 held = _held(slot);
        if (held != expectedHeld) revert HoldingsChanged(fundingId(channelId, participant), expectedHeld, held);
        _setHeld(slot, held + arrived); // checked: an overflowing deposit reverts
        emit Deposited(channelId, participant, arrived);
    }

    /// Sets the channel's outcome and pushes it; only the adjudicator calls it, once per channel
    /// (as it concludes). The outcome is paid only if every slot holds at least its funding and
    /// the outcome sums to the funding; then each participant also gets back what it deposited
    /// above its funding. Otherwise every participant gets back exactly what it holds.
    function setOutcome(
        bytes32 channelId,
        address[] calldata participants,
        uint256[] calldata funding,
        uint256[] calldata amounts
    ) external {
        if (msg.sender != adjudicator) revert NotAdjudicator();
        uint256 n = participants.length;
        if (amounts.length != n || funding.length != n) revert Lengths();
        bytes32[] memory slots = new bytes32[](n);
        uint256[] memory pay = new uint256[](n);
        _settle(channelId, participants, funding, amounts, slots, pay);
        emit OutcomeSet(channelId);
        for (uint256 i = 0; i < n; ++i) {
            uint256 amount = pay[i];
            if (amount == 0) continue;
            address p = participants[i];
            if (_tryPay(p, amount)) {
                emit Paid(channelId, p, amount);
            } else {
                // Credits add: the slot may have received a deposit from a re-entering token.
                _setHeld(slots[i], _held(slots[i]) + amount);
                emit Credited(channelId, p, amount);
            }
        }
    }

    /// Empties every slot at once (before any payment) and writes each participant's payout
    /// into `pay`.
    function _settle(
        bytes32 channelId,
        address[] calldata participants,
        uint256[] calldata funding,
        uint256[] calldata amounts,
        bytes32[] memory slots,
        uint256[] memory pay
    ) private {
        uint256 n = participants.length;
        bool covered = true;
        uint256 funded;
        uint256 owed;
        for (uint256 i = 0; i < n; ++i) {
            bytes32 slot = _slot(channelId, participants[i]);
            uint256 h = _held(slot);
            if (h != 0) _setHeld(slot, 0);
            slots[i] = slot;
            pay[i] = h;
            uint256 f = funding[i];
            uint256 o = amounts[i];
            // Sums that wrap cannot match: such an outcome is not paid, the deposits are.
            unchecked {
                funded += f;
                owed += o;
                if (h < f || funded < f || owed < o) covered = false;
            }
        }
        if (covered && funded == owed) {
            for (uint256 i = 0; i < n; ++i) {
                // held - funding is the participant's surplus; the payouts sum to what is held.
                unchecked {
                    pay[i] = amounts[i] + (pay[i] - funding[i]);
                }
            }
        }
    }

    /// Pays the participant's credit (up to auth.amount) to auth.receiver. The participant calls it
    /// itself or signs the auth (EIP-191 over this holder, the chain id and the auth), which is
    /// then used up: its nonce must be the participant's current one, and the call advances it.
    function withdraw(WithdrawalAuth calldata auth, bytes calldata sig) external {
        _enter();
        if (msg.sender != auth.participant) {
            uint256 expected = withdrawNonces[auth.participant];
            if (auth.nonce != expected) revert WrongNonce(expected, auth.nonce);
            bytes32 digest = keccak256(abi.encode(address(this), block.chainid, auth));
            address signer = ECDSA.recoverCalldata(MessageHashUtils.toEthSignedMessageHash(digest), sig);
            if (signer != auth.participant) revert WrongSigner();
            unchecked {
                withdrawNonces[auth.participant] = expected + 1;
            }
        }
        if (!_concluded(auth.channelId)) revert NotSettled();
        bytes32 slot = _slot(auth.channelId, auth.participant);
        uint256 credit = _held(slot);
        uint256 amount = auth.amount < credit ? auth.amount : credit;
        if (amount != 0) {
            _setHeld(slot, credit - amount);
            _pay(auth.receiver, amount);
            emit Withdrawn(auth.channelId, auth.participant, auth.receiver, amount);
        }
        _exit();
    }

    /// The storage slot of the amount held for the participant in the channel.
    function _slot(bytes32 channelId, address participant) internal pure returns (bytes32 slot) {
        bytes32 tag = HOLDINGS;
        assembly ("memory-safe") {
            let m := mload(0x40) // scratch past the free memory pointer
            mstore(m, channelId)
            mstore(add(m, 0x20), participant)
            mstore(add(m, 0x40), tag)
            slot := keccak256(m, 0x60)
        }
    }

    /// The amount held at `slot`.
    function _held(bytes32 slot) internal view returns (uint256 amount) {
        assembly ("memory-safe") {
            amount := sload(slot)
        }
    }

    /// Sets the amount held at `slot`.
    function _setHeld(bytes32 slot, uint256 amount) internal {
        assembly ("memory-safe") {
            sstore(slot, amount)
        }
    }

    /// Whether the adjudicator concluded the channel (and so set its outcome here).
    function _concluded(bytes32 channelId) internal view returns (bool) {
        return ISettled(adjudicator).settled(channelId);
    }

    /// Takes `amount` of the asset from the caller; returns what arrived.
    function _receive(uint256 amount) internal virtual returns (uint256 arrived);

    /// Pays `amount` to `to`, reverting on failure.
    function _pay(address to, uint256 amount) internal virtual;

    /// Tries to pay `amount` to `to` with bounded gas; false leaves it to a later withdraw.
    function _tryPay(address to, uint256 amount) internal virtual returns (bool);

    /// Guards deposit and withdraw against re-entry where the asset can call back (a token).
    function _enter() internal virtual {}

    /// Ends the guard of `_enter`.
    function _exit() internal virtual {}
}
