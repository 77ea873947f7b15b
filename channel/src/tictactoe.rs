//! Tic-tac-toe: a two-player app with turns, checked the same way off-chain
//! (here) and on-chain (`TicTacToeApp.sol`, the same checks in the same
//! order, so both report the same reason).
//!
//! # App data
//! Exactly [`DATA_LEN`] bytes: byte 0 is the participant whose move it is
//! (0 or 1), bytes 1..=9 the cells row by row (0 empty, 1 participant 0's
//! mark, 2 participant 1's).
//!
//! # Money
//! For each asset the pot is the sum of the balances. After a move that
//! wins, the winner holds the whole pot; after a move that fills the board
//! without a winner, each participant holds its deposit again; after any
//! other move **the mover holds the pot** until the other player answers.
//! So a player who stops answering forfeits: the mover forces its move
//! on-chain (`progress`), and if no answer comes before the timeout the
//! channel concludes with the mover holding the pot. A state that ends the
//! game is final.
//!
//! # Example
//! ```
//! use perun_channel::tictactoe::{Board, Illegal, TicTacToe};
//! use perun_channel::{Allocation, Asset, Domain, Params, State, Address, U256};
//!
//! let domain = Domain { chain_id: U256::from(31337), adjudicator: Address::repeat_byte(0xad) };
//! let stakes = vec![vec![U256::from(5), U256::from(5)]];
//! let mut params = Params::payment(domain, 60, U256::from(1),
//!     vec![Address::repeat_byte(1), Address::repeat_byte(2)], stakes.clone());
//! params.app = Address::repeat_byte(0x77);
//! let asset = Asset { chainId: U256::from(31337), holder: Address::repeat_byte(0xaa) };
//! let mut s0 = State::initial(&params, Allocation::new(vec![asset], stakes));
//! s0.appData = TicTacToe::initial_data(0);
//!
//! let s1 = TicTacToe.play(&params, &s0, 0, 4)?;           // participant 0 takes the centre
//! assert_eq!(s1.balance(0, 0), Some(U256::from(10)));     // and holds the pot until 1 answers
//! assert_eq!(TicTacToe.play(&params, &s1, 0, 0), Err(Illegal::NotYourTurn { expected: 1, actor: 0 }));
//! assert_eq!(TicTacToe.play(&params, &s1, 1, 4), Err(Illegal::Occupied(4)));
//! println!("{}", Board::decode(&s1.appData).unwrap());
//! # Ok::<(), Illegal>(())
//! ```

use std::fmt;

use alloy_primitives::{Bytes, U256};

use crate::app::{App, AppRejection};
use crate::{Params, State};

/// Length of the app data.
pub const DATA_LEN: usize = 10;

/// The lines of three cells that win.
const LINES: [[usize; 3]; 8] = [
    [0, 1, 2],
    [3, 4, 5],
    [6, 7, 8],
    [0, 3, 6],
    [1, 4, 7],
    [2, 5, 8],
    [0, 4, 8],
    [2, 4, 6],
];

/// Why a tic-tac-toe move is refused: the reasons of `TicTacToeApp.sol`, in
/// the order it checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Illegal {
    /// Tic-tac-toe has exactly two players.
    #[error("tic-tac-toe needs 2 participants, got {0}")]
    Participants(usize),
    /// The app data of the state before (0) or after (1) the move is not a board.
    #[error("the app data of the {} state is not a board", if *.0 == 0 { "current" } else { "next" })]
    BadData(u8),
    /// The game has a winner or the board is full.
    #[error("the game is over")]
    GameOver,
    /// It is the other player's move.
    #[error("it is participant {expected}'s move, not {actor}'s")]
    NotYourTurn {
        /// Whose move it is.
        expected: usize,
        /// Who tried to move.
        actor: usize,
    },
    /// The cell is taken.
    #[error("cell {0} is taken")]
    Occupied(usize),
    /// No cell changed.
    #[error("no move")]
    NoMove,
    /// More than one cell changed.
    #[error("more than one cell changed")]
    SeveralMoves,
    /// The new mark in this cell is not the mover's.
    #[error("cell {0} is marked for the wrong player")]
    WrongMark(usize),
    /// The next state does not hand the move to the other player.
    #[error("the move does not pass the turn to the other player")]
    WrongNextActor,
    /// The balances of this asset are not what the board says.
    #[error("the outcome of asset {0} does not follow the board")]
    WrongOutcome(usize),
    /// `isFinal` must be set exactly when the game ends.
    #[error("isFinal must be set exactly when the game ends")]
    WrongFinal,
    /// A cell index outside 0..9 (only from [`TicTacToe::play`]).
    #[error("cell {0} is outside the board")]
    NoSuchCell(usize),
}

/// A tic-tac-toe board: whose move it is and who holds each cell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Board {
    /// The participant whose move it is.
    pub next: usize,
    /// The participant holding each cell, row by row.
    pub cells: [Option<usize>; 9],
}

impl Board {
    /// An empty board, `first` to move.
    pub fn new(first: usize) -> Self {
        Self {
            next: first,
            cells: [None; 9],
        }
    }

    /// Reads a board from app data; `None` if it is not exactly one.
    pub fn decode(data: &[u8]) -> Option<Self> {
        if data.len() != DATA_LEN || data[0] > 1 {
            return None;
        }
        let mut cells = [None; 9];
        for (cell, b) in cells.iter_mut().zip(&data[1..]) {
            *cell = match b {
                0 => None,
                1 => Some(0),
                2 => Some(1),
                _ => return None,
            };
        }
        Some(Self {
            next: usize::from(data[0]),
            cells,
        })
    }

    /// The board as app data.
    pub fn encode(&self) -> Bytes {
        let mut data = [0u8; DATA_LEN];
        // `next` is 0 or 1 on every board this module builds.
        data[0] = u8::from(self.next != 0);
        for (b, cell) in data[1..].iter_mut().zip(&self.cells) {
            *b = cell.map_or(0, |p| if p == 0 { 1 } else { 2 });
        }
        Bytes::copy_from_slice(&data)
    }

    /// The participant with three in a row, if any.
    pub fn winner(&self) -> Option<usize> {
        LINES.iter().find_map(|[a, b, c]| {
            let p = self.cells[*a]?;
            (self.cells[*b] == Some(p) && self.cells[*c] == Some(p)).then_some(p)
        })
    }

    /// Whether every cell is taken.
    pub fn is_full(&self) -> bool {
        self.cells.iter().all(Option::is_some)
    }

    /// Whether the game has ended (a winner, or a full board).
    pub fn is_over(&self) -> bool {
        self.winner().is_some() || self.is_full()
    }
}

impl fmt::Display for Board {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (row, cells) in self.cells.chunks(3).enumerate() {
            if row > 0 {
                writeln!(f, "---+---+---")?;
            }
            let marks: Vec<&str> = cells
                .iter()
                .map(|c| match c {
                    None => " ",
                    Some(0) => "X",
                    Some(_) => "O",
                })
                .collect();
            writeln!(f, " {} | {} | {}", marks[0], marks[1], marks[2])?;
        }
        Ok(())
    }
}

/// The tic-tac-toe rules (participant 0 plays X, participant 1 plays O).
#[derive(Debug, Default, Clone, Copy)]
pub struct TicTacToe;

impl TicTacToe {
    /// Version 0's app data: an empty board with `first` to move.
    pub fn initial_data(first: usize) -> Bytes {
        Board::new(first).encode()
    }

    /// The state after `actor` marks `cell` in `state`: next version, the
    /// turn passed, the outcome the board calls for. Checked by the rules,
    /// so it is a state the other player and the app contract accept.
    pub fn play(
        &self,
        params: &Params,
        state: &State,
        actor: usize,
        cell: usize,
    ) -> Result<State, Illegal> {
        let mut board = Board::decode(&state.appData).ok_or(Illegal::BadData(0))?;
        if cell >= 9 {
            return Err(Illegal::NoSuchCell(cell));
        }
        check_turn(params, &board, actor)?;
        if board.cells[cell].is_some() {
            return Err(Illegal::Occupied(cell));
        }
        board.cells[cell] = Some(actor);
        board.next = 1 - actor;
        let mut next = state.next();
        next.isFinal = board.is_over();
        next.appData = board.encode();
        next.outcome.balances = outcome(params, state, &board, actor)?;
        check(params, state, &next, actor)?;
        Ok(next)
    }
}

impl App for TicTacToe {
    fn valid_init(&self, params: &Params, state: &State) -> Result<(), AppRejection> {
        if params.participants.len() != 2 {
            return Err(Illegal::Participants(params.participants.len()).into());
        }
        match Board::decode(&state.appData) {
            Some(b) if b.cells.iter().all(Option::is_none) && !state.isFinal => Ok(()),
            _ => Err(Illegal::BadData(0).into()),
        }
    }

    fn valid_transition(
        &self,
        params: &Params,
        from: &State,
        to: &State,
        actor: usize,
    ) -> Result<(), AppRejection> {
        check(params, from, to, actor).map_err(AppRejection::new)
    }

    fn next_actor(&self, _params: &Params, state: &State) -> Option<usize> {
        Board::decode(&state.appData)
            .filter(|b| !b.is_over())
            .map(|b| b.next)
    }
}

/// The rules, in `TicTacToeApp.sol`'s order.
fn check(params: &Params, from: &State, to: &State, actor: usize) -> Result<(), Illegal> {
    let n = params.participants.len();
    if n != 2 {
        return Err(Illegal::Participants(n));
    }
    let cur = Board::decode(&from.appData).ok_or(Illegal::BadData(0))?;
    let next = Board::decode(&to.appData).ok_or(Illegal::BadData(1))?;
    check_turn(params, &cur, actor)?;
    let mut changed = None;
    let mut count = 0;
    for (i, (a, b)) in cur.cells.iter().zip(&next.cells).enumerate() {
        if a != b {
            if a.is_some() {
                return Err(Illegal::Occupied(i));
            }
            count += 1;
            changed = Some(i);
        }
    }
    let cell = match (count, changed) {
        (1, Some(cell)) => cell,
        (0, _) => return Err(Illegal::NoMove),
        _ => return Err(Illegal::SeveralMoves),
    };
    if next.cells[cell] != Some(actor) {
        return Err(Illegal::WrongMark(cell));
    }
    if next.next != 1 - actor {
        return Err(Illegal::WrongNextActor);
    }
    let expected = outcome(params, from, &next, actor)?;
    if to.outcome.balances.len() != expected.len() {
        return Err(Illegal::WrongOutcome(
            expected.len().min(to.outcome.balances.len()),
        ));
    }
    for (i, (want, got)) in expected.iter().zip(&to.outcome.balances).enumerate() {
        if want != got {
            return Err(Illegal::WrongOutcome(i));
        }
    }
    if to.isFinal != next.is_over() {
        return Err(Illegal::WrongFinal);
    }
    Ok(())
}

/// Two players, the game still on, and `actor`'s move.
fn check_turn(params: &Params, cur: &Board, actor: usize) -> Result<(), Illegal> {
    let n = params.participants.len();
    if n != 2 {
        return Err(Illegal::Participants(n));
    }
    if cur.is_over() {
        return Err(Illegal::GameOver);
    }
    if actor != cur.next {
        return Err(Illegal::NotYourTurn {
            expected: cur.next,
            actor,
        });
    }
    Ok(())
}

/// The balances `board` calls for after `actor`'s move from `from`.
fn outcome(
    params: &Params,
    from: &State,
    board: &Board,
    actor: usize,
) -> Result<Vec<Vec<U256>>, Illegal> {
    let winner = board.winner();
    let draw = winner.is_none() && board.is_full();
    from.outcome
        .balances
        .iter()
        .enumerate()
        .map(|(i, row)| {
            if draw {
                return params
                    .funding
                    .get(i)
                    .cloned()
                    .ok_or(Illegal::WrongOutcome(i));
            }
            let pot = row
                .iter()
                .try_fold(U256::ZERO, |acc, b| acc.checked_add(*b))
                .ok_or(Illegal::WrongOutcome(i))?;
            let holder = winner.unwrap_or(actor);
            Ok((0..row.len())
                .map(|p| if p == holder { pot } else { U256::ZERO })
                .collect())
        })
        .collect()
}
