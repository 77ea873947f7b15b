// SPDX-License-Identifier: MIT OR Apache-2.0
pragma solidity 0.8.37;

import {Params, State} from "../Channel.sol";
import {IApp} from "../IApp.sol";

/// Tic-tac-toe between two participants, the same rules as the Rust `TicTacToe` app
/// (perun_channel::tictactoe), checked in the same order so both report the same reason.
///
/// appData is 10 bytes: the next actor (0 or 1), then cells 0..8 row-major (0 empty,
/// 1 participant 0's mark, 2 participant 1's). The mover holds the pot until the other
/// answers, so a player who goes silent forfeits; a win pays the pot to the winner, a
/// draw refunds the deposits, and either ends the game (a final state).
contract TicTacToeApp is IApp {
    /// The game needs exactly two participants; it has `n`.
    error Participants(uint256 n);
    /// The appData of `from` (0) or `to` (1) is not a board.
    error BadData(uint256 which);
    /// `from` is won or full: no move follows it.
    error GameOver();
    /// It is `expected`'s move, not `actor`'s.
    error NotYourTurn(uint256 expected, uint256 actor);
    /// Cell `cell` was marked already.
    error Occupied(uint256 cell);
    /// No cell changed.
    error NoMove();
    /// More than one cell changed.
    error SeveralMoves();
    /// Cell `cell` does not carry the actor's mark.
    error WrongMark(uint256 cell);
    /// `to` does not name the other participant as the next actor.
    error WrongNextActor();
    /// Asset `asset`'s balances are not what the board says.
    error WrongOutcome(uint256 asset);
    /// `to.isFinal` does not say whether the game is over.
    error WrongFinal();

    uint256 private constant DATA_LEN = 10;

    function validTransition(Params calldata params, State calldata from, State calldata to, uint256 actor)
        external
        pure
        override
    {
        uint256 n = params.participants.length;
        if (n != 2) revert Participants(n);
        bytes calldata a = from.appData;
        bytes calldata b = to.appData;
        if (!_wellFormed(a)) revert BadData(0);
        if (!_wellFormed(b)) revert BadData(1);
        if (_winner(a) != 0 || _full(a)) revert GameOver();
        uint256 next = uint8(a[0]);
        if (actor != next) revert NotYourTurn(next, actor);
        uint256 changed = 0;
        uint256 cell = 0;
        for (uint256 i = 0; i < 9; ++i) {
            if (a[i + 1] != b[i + 1]) {
                if (a[i + 1] != 0) revert Occupied(i);
                ++changed;
                cell = i;
            }
        }
        if (changed == 0) revert NoMove();
        if (changed > 1) revert SeveralMoves();
        if (uint8(b[cell + 1]) != actor + 1) revert WrongMark(cell);
        if (uint8(b[0]) != 1 - actor) revert WrongNextActor();
        uint256 w = _winner(b);
        bool full = _full(b);
        _checkOutcome(params, from, to, actor, w, full);
        if (to.isFinal != (w != 0 || full)) revert WrongFinal();
    }

    /// Each asset's pot goes to the winner, back to the depositors on a draw (`params.funding`),
    /// and to the mover while the game goes on. As the Rust app: first every expected row is
    /// computed (a missing funding row or an overflowing pot fails at its asset), then the
    /// number of rows is compared (failing at the shorter count), then each row.
    function _checkOutcome(
        Params calldata params,
        State calldata from,
        State calldata to,
        uint256 actor,
        uint256 w,
        bool full
    ) private pure {
        uint256[][] calldata fb = from.outcome.balances;
        uint256[][] calldata tb = to.outcome.balances;
        uint256 assets = fb.length;
        bool draw = w == 0 && full;
        uint256 holder = w != 0 ? w - 1 : actor;
        for (uint256 i = 0; i < assets; ++i) {
            if (draw) {
                if (i >= params.funding.length) revert WrongOutcome(i);
            } else {
                (, bool ok) = _pot(fb[i]);
                if (!ok) revert WrongOutcome(i);
            }
        }
        if (tb.length != assets) revert WrongOutcome(tb.length < assets ? tb.length : assets);
        for (uint256 i = 0; i < assets; ++i) {
            uint256[] calldata got = tb[i];
            if (draw) {
                uint256[] calldata want = params.funding[i];
                if (got.length != want.length) revert WrongOutcome(i);
                for (uint256 p = 0; p < want.length; ++p) {
                    if (got[p] != want[p]) revert WrongOutcome(i);
                }
            } else {
                (uint256 pot,) = _pot(fb[i]);
                if (got.length != fb[i].length) revert WrongOutcome(i);
                for (uint256 p = 0; p < got.length; ++p) {
                    if (got[p] != (p == holder ? pot : 0)) revert WrongOutcome(i);
                }
            }
        }
    }

    /// The sum of a row, and whether it fits in 256 bits.
    function _pot(uint256[] calldata row) private pure returns (uint256 pot, bool ok) {
        for (uint256 p = 0; p < row.length; ++p) {
            unchecked {
                uint256 s = pot + row[p];
                if (s < pot) return (0, false);
                pot = s;
            }
        }
        return (pot, true);
    }

    /// 10 bytes, the next actor 0 or 1, every cell 0, 1 or 2.
    function _wellFormed(bytes calldata d) private pure returns (bool) {
        if (d.length != DATA_LEN || uint8(d[0]) > 1) return false;
        for (uint256 i = 1; i < DATA_LEN; ++i) {
            if (uint8(d[i]) > 2) return false;
        }
        return true;
    }

    /// The mark (1 or 2) of a row, column or diagonal of three equal marks; 0 if none.
    function _winner(bytes calldata d) private pure returns (uint256) {
        uint8[3][8] memory lines = [
            [0, 1, 2], [3, 4, 5], [6, 7, 8], [0, 3, 6], [1, 4, 7], [2, 5, 8], [0, 4, 8], [2, 4, 6]
        ];
        for (uint256 l = 0; l < 8; ++l) {
            uint8 m = uint8(d[lines[l][0] + 1]);
            if (m != 0 && uint8(d[lines[l][1] + 1]) == m && uint8(d[lines[l][2] + 1]) == m) return m;
        }
        return 0;
    }

    /// Whether no cell is empty.
    function _full(bytes calldata d) private pure returns (bool) {
        for (uint256 i = 1; i < DATA_LEN; ++i) {
            if (d[i] == 0) return false;
        }
        return true;
    }
}
