//! The tic-tac-toe rules: every reason, a win, a draw, and who moves next.

use perun_channel::tictactoe::{Board, Illegal, TicTacToe};
use perun_channel::{Address, Allocation, App, Asset, Domain, Error, Params, State, U256};

fn game() -> (Params, State) {
    let domain = Domain {
        chain_id: U256::from(31337),
        adjudicator: Address::repeat_byte(0xad),
    };
    let stakes = vec![
        vec![U256::from(5), U256::from(7)],
        vec![U256::from(1), U256::ZERO],
    ];
    let mut params = Params::payment(
        domain,
        60,
        U256::from(1),
        vec![Address::repeat_byte(1), Address::repeat_byte(2)],
        stakes.clone(),
    );
    params.app = Address::repeat_byte(0x77);
    let assets = (0..2u8)
        .map(|i| Asset {
            chainId: U256::from(31337),
            holder: Address::repeat_byte(0xa0 + i),
        })
        .collect();
    let mut s0 = State::initial(&params, Allocation::new(assets, stakes));
    s0.appData = TicTacToe::initial_data(0);
    TicTacToe
        .valid_init(&params, &s0)
        .expect("valid initial state");
    (params, s0)
}

fn reason(r: Result<(), perun_channel::AppRejection>) -> Illegal {
    *r.expect_err("refused")
        .downcast_ref::<Illegal>()
        .expect("a tic-tac-toe reason")
}

/// Plays `cells` in turn, checking each move by the full rule.
fn play(params: &Params, mut s: State, cells: &[usize]) -> State {
    for &cell in cells {
        let actor = Board::decode(&s.appData).expect("board").next;
        let next = TicTacToe.play(params, &s, actor, cell).expect("legal move");
        s.validate_transition(params, &next, actor, &TicTacToe)
            .expect("generic and app rule");
        s = next;
    }
    s
}

#[test]
fn the_mover_holds_the_pot_and_the_winner_takes_it() {
    let (params, s0) = game();
    let s1 = play(&params, s0.clone(), &[4]);
    assert_eq!(s1.outcome.balances[0], vec![U256::from(12), U256::ZERO]);
    assert_eq!(s1.outcome.balances[1], vec![U256::from(1), U256::ZERO]);
    assert_eq!(TicTacToe.next_actor(&params, &s1), Some(1));
    let s2 = play(&params, s1, &[0]);
    assert_eq!(s2.outcome.balances[0], vec![U256::ZERO, U256::from(12)]);
    // X: 4, 2, 6 wins on the diagonal; O: 0, 1.
    let won = play(&params, s0, &[4, 0, 2, 1, 6]);
    assert!(won.isFinal);
    assert_eq!(
        Board::decode(&won.appData).and_then(|b| b.winner()),
        Some(0)
    );
    assert_eq!(won.outcome.balances[0], vec![U256::from(12), U256::ZERO]);
    assert_eq!(TicTacToe.next_actor(&params, &won), None);
    assert_eq!(TicTacToe.play(&params, &won, 1, 8), Err(Illegal::GameOver));
    // Nothing follows a final state, by the generic rule too.
    let mut after = won.next();
    after.appData = won.appData.clone();
    assert_eq!(
        won.validate_transition(&params, &after, 1, &TicTacToe),
        Err(Error::Final)
    );
}

#[test]
fn a_draw_refunds_the_deposits() {
    let (params, s0) = game();
    // X O X / X O O / O X X
    let drawn = play(&params, s0, &[0, 1, 2, 4, 3, 5, 7, 6, 8]);
    let board = Board::decode(&drawn.appData).expect("board");
    assert!(board.is_full() && board.winner().is_none());
    assert!(drawn.isFinal);
    assert_eq!(drawn.outcome.balances, params.funding);
}

#[test]
fn every_illegal_move_has_its_reason() {
    let (params, s0) = game();
    let s1 = play(&params, s0.clone(), &[4]);
    assert_eq!(
        TicTacToe.play(&params, &s1, 0, 0),
        Err(Illegal::NotYourTurn {
            expected: 1,
            actor: 0
        })
    );
    assert_eq!(
        TicTacToe.play(&params, &s1, 1, 4),
        Err(Illegal::Occupied(4))
    );
    assert_eq!(
        TicTacToe.play(&params, &s1, 1, 9),
        Err(Illegal::NoSuchCell(9))
    );

    let legal = TicTacToe.play(&params, &s1, 1, 0).expect("legal");
    let with = |f: &dyn Fn(&mut Board, &mut State)| {
        let mut to = legal.clone();
        let mut b = Board::decode(&to.appData).expect("board");
        f(&mut b, &mut to);
        if to.appData == legal.appData {
            to.appData = b.encode();
        }
        reason(TicTacToe.valid_transition(&params, &s1, &to, 1))
    };
    assert_eq!(
        with(&|_, s| s.appData = vec![0u8; 9].into()),
        Illegal::BadData(1)
    );
    assert_eq!(
        with(&|_, s| s.appData = vec![0, 0, 0, 0, 0, 3, 0, 0, 0, 0].into()),
        Illegal::BadData(1)
    );
    assert_eq!(with(&|b, _| b.cells[4] = Some(1)), Illegal::Occupied(4));
    assert_eq!(with(&|b, _| b.cells[0] = None), Illegal::NoMove);
    assert_eq!(with(&|b, _| b.cells[8] = Some(1)), Illegal::SeveralMoves);
    assert_eq!(with(&|b, _| b.cells[0] = Some(0)), Illegal::WrongMark(0));
    assert_eq!(with(&|b, _| b.next = 1), Illegal::WrongNextActor);
    assert_eq!(
        with(&|_, s| s.outcome.balances[1] = vec![U256::from(1), U256::ZERO]),
        Illegal::WrongOutcome(1)
    );
    assert_eq!(with(&|_, s| s.isFinal = true), Illegal::WrongFinal);
    let mut bad_from = s1.clone();
    bad_from.appData = vec![2u8; 10].into();
    assert_eq!(
        reason(TicTacToe.valid_transition(&params, &bad_from, &legal, 1)),
        Illegal::BadData(0)
    );
    let mut three = params.clone();
    three.participants.push(Address::repeat_byte(3));
    assert_eq!(
        reason(TicTacToe.valid_transition(&three, &s1, &legal, 1)),
        Illegal::Participants(3)
    );
    // Through the generic rule, the reason stays typed.
    let mut occupied = legal.clone();
    let mut b = Board::decode(&occupied.appData).expect("board");
    b.cells[4] = Some(1);
    b.cells[0] = None;
    occupied.appData = b.encode();
    match s1.validate_transition(&params, &occupied, 1, &TicTacToe) {
        Err(Error::App(r)) => assert_eq!(r.downcast_ref::<Illegal>(), Some(&Illegal::Occupied(4))),
        other => panic!("expected the app's reason, got {other:?}"),
    }
}

#[test]
fn the_initial_state_must_be_an_empty_board() {
    let (params, mut s0) = game();
    s0.appData = Board {
        next: 0,
        cells: [Some(0), None, None, None, None, None, None, None, None],
    }
    .encode();
    assert_eq!(
        reason(TicTacToe.valid_init(&params, &s0)),
        Illegal::BadData(0)
    );
    s0.appData = perun_channel::Bytes::new();
    assert_eq!(
        reason(TicTacToe.valid_init(&params, &s0)),
        Illegal::BadData(0)
    );
}
