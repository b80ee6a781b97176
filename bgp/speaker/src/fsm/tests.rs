//! Synchronous tests of the session FSM: every state against every event, then the
//! behaviours RFC 4271 §8, §6.8, RFC 4724 §4.2 and RFC 9687 ask for.

use super::*;
use margay_bgp_wire::GracefulRestartFamily;

const C1: ConnId = ConnId(1);
const C2: ConnId = ConnId(2);
const LOCAL_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 5);

fn cfg() -> FsmConfig {
    let mut c = FsmConfig::new(65001, 65002, LOCAL_ID);
    c.connect_retry = Duration::from_secs(5);
    c
}

fn peer_open(hold: u16, id: Ipv4Addr) -> Open {
    Open::new(
        65002,
        hold,
        id,
        vec![
            Capability::Multiprotocol { afi: 1, safi: 1 },
            Capability::RouteRefresh,
        ],
    )
}

fn good_open() -> Open {
    peer_open(90, Ipv4Addr::new(10, 0, 0, 9))
}

fn notif(code_: u8, sub: u8) -> Notification {
    Notification::error(code_, sub, Vec::new())
}

/// An FSM driven to `state` with C1 as its connection (outbound).
fn fsm_in(state: State) -> Fsm {
    fsm_in_with(state, cfg())
}

fn fsm_in_with(state: State, config: FsmConfig) -> Fsm {
    let mut f = Fsm::new(config);
    if state == State::Idle {
        return f;
    }
    f.handle(Event::ManualStart);
    if state == State::Connect {
        return f;
    }
    if state == State::Active {
        f.handle(Event::TcpConnectionFails(ConnId(0)));
        assert_eq!(f.state(), State::Active);
        return f;
    }
    f.handle(Event::TcpCrAcked(C1));
    if state == State::OpenSent {
        return f;
    }
    f.handle(Event::BgpOpen(C1, good_open()));
    if state == State::OpenConfirm {
        return f;
    }
    f.handle(Event::KeepAliveMsg(C1));
    assert_eq!(f.state(), State::Established);
    f
}

fn sent_notification(actions: &[Action]) -> Option<&Notification> {
    actions.iter().find_map(|a| match a {
        Action::Send(_, Outgoing::Notification(n)) => Some(n),
        _ => None,
    })
}

fn timer_started(actions: &[Action], t: Timer) -> Option<Duration> {
    actions.iter().find_map(|a| match a {
        Action::StartTimer(tt, d) if *tt == t => Some(*d),
        _ => None,
    })
}

const STATES: [State; 6] = [
    State::Idle,
    State::Connect,
    State::Active,
    State::OpenSent,
    State::OpenConfirm,
    State::Established,
];

/// Every state × every event: the state that follows. Columns are Idle, Connect,
/// Active, OpenSent, OpenConfirm, Established (the Idle FSM is administratively down).
#[test]
fn every_state_and_event_has_the_expected_next_state() {
    use State::*;
    let rows: Vec<(Event, [State; 6])> = vec![
        (
            Event::ManualStart,
            [Connect, Connect, Active, OpenSent, OpenConfirm, Established],
        ),
        (
            Event::ManualStop {
                message: "bye".into(),
            },
            [Idle, Idle, Idle, Idle, Idle, Idle],
        ),
        (
            Event::AutomaticStart,
            [Idle, Connect, Active, OpenSent, OpenConfirm, Established],
        ),
        (
            Event::AutomaticStop(notif(6, 1)),
            [Idle, Idle, Idle, Idle, Idle, Idle],
        ),
        (
            Event::ConnectRetryTimerExpires,
            [Idle, Connect, Connect, OpenSent, OpenConfirm, Established],
        ),
        (
            Event::HoldTimerExpires,
            [Idle, Connect, Active, Idle, Idle, Idle],
        ),
        (
            Event::KeepaliveTimerExpires,
            [Idle, Connect, Active, OpenSent, OpenConfirm, Established],
        ),
        (
            Event::IdleHoldTimerExpires,
            [Idle, Connect, Active, OpenSent, OpenConfirm, Established],
        ),
        (
            Event::SendHoldTimerExpires,
            [Idle, Connect, Active, Idle, Idle, Idle],
        ),
        (
            Event::TcpCrAcked(ConnId(9)),
            [Idle, OpenSent, OpenSent, OpenSent, OpenConfirm, Established],
        ),
        (
            Event::TcpConnectionConfirmed(ConnId(9)),
            [Idle, OpenSent, OpenSent, OpenSent, OpenConfirm, Established],
        ),
        (
            Event::TcpConnectionFails(C1),
            [Idle, Active, Active, Active, Idle, Idle],
        ),
        (
            Event::BgpOpen(C1, good_open()),
            [Idle, Connect, Active, OpenConfirm, Idle, Idle],
        ),
        (
            Event::BgpHeaderErr(C1, notif(1, 2)),
            [Idle, Connect, Active, Idle, Idle, Idle],
        ),
        (
            Event::BgpOpenMsgErr(C1, notif(2, 4)),
            [Idle, Connect, Active, Idle, Idle, Idle],
        ),
        (
            Event::NotifMsgVerErr(C1),
            [Idle, Connect, Active, Idle, Idle, Idle],
        ),
        (
            Event::NotifMsg(C1, notif(6, 2)),
            [Idle, Connect, Active, Idle, Idle, Idle],
        ),
        (
            Event::KeepAliveMsg(C1),
            [Idle, Connect, Active, Idle, Established, Established],
        ),
        (
            Event::UpdateMsg(C1),
            [Idle, Connect, Active, Idle, Idle, Established],
        ),
        (
            Event::UpdateMsgErr(C1, notif(3, 1)),
            [Idle, Connect, Active, Idle, Idle, Idle],
        ),
        (
            Event::RouteRefreshMsg(C1),
            [Idle, Connect, Active, Idle, Idle, Established],
        ),
    ];
    for (event, expected) in rows {
        for (i, from) in STATES.iter().enumerate() {
            let mut f = fsm_in(*from);
            f.handle(event.clone());
            assert_eq!(
                f.state(),
                expected[i],
                "{from:?} + {event:?} should go to {:?}",
                expected[i]
            );
        }
    }
}

#[test]
fn manual_start_connects_and_arms_connect_retry() {
    let mut f = Fsm::new(cfg());
    let a = f.handle(Event::ManualStart);
    assert!(a.contains(&Action::Connect));
    assert_eq!(
        timer_started(&a, Timer::ConnectRetry),
        Some(Duration::from_secs(5))
    );
    assert_eq!(f.state(), State::Connect);
}

#[test]
fn passive_start_waits_in_active_without_connecting() {
    let mut c = cfg();
    c.mode = ConnectMode::Passive;
    let mut f = Fsm::new(c);
    let a = f.handle(Event::ManualStart);
    assert!(!a.contains(&Action::Connect));
    assert_eq!(f.state(), State::Active);
    // The connect retry timer never makes a passive session connect.
    assert!(f.handle(Event::ConnectRetryTimerExpires).is_empty());
    assert_eq!(f.state(), State::Active);
    let a = f.handle(Event::TcpConnectionConfirmed(C1));
    assert!(matches!(
        a.as_slice(),
        [_, Action::Send(C1, Outgoing::Open(_)), ..]
    ));
    assert_eq!(f.state(), State::OpenSent);
}

#[test]
fn active_mode_refuses_the_peers_connections() {
    let mut c = cfg();
    c.mode = ConnectMode::Active;
    let mut f = Fsm::new(c);
    f.handle(Event::ManualStart);
    let a = f.handle(Event::TcpConnectionConfirmed(C2));
    assert_eq!(a, vec![Action::Close(C2)]);
    assert_eq!(f.state(), State::Connect);
}

#[test]
fn failed_connect_waits_for_connect_retry_then_connects_again() {
    let mut f = fsm_in(State::Connect);
    assert!(f.handle(Event::TcpConnectionFails(ConnId(0))).is_empty());
    assert_eq!(f.state(), State::Active);
    let a = f.handle(Event::ConnectRetryTimerExpires);
    assert!(a.contains(&Action::Connect));
    assert_eq!(f.state(), State::Connect);
    assert_eq!(f.connect_retry_counter(), 1);
    // A retry while a connect is still pending abandons the old attempt first.
    let a = f.handle(Event::ConnectRetryTimerExpires);
    assert_eq!(a[0], Action::AbortConnect);
}

#[test]
fn inbound_connection_in_connect_replaces_the_outbound_attempt() {
    let mut f = fsm_in(State::Connect);
    let a = f.handle(Event::TcpConnectionConfirmed(C2));
    assert_eq!(a[0], Action::AbortConnect);
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Send(C2, Outgoing::Open(_)))));
    assert_eq!(timer_started(&a, Timer::Hold), Some(OPEN_HOLD_TIME));
    assert_eq!(f.connection(), Some(C2));
}

#[test]
fn open_negotiates_hold_time_as_the_minimum_and_keepalive_as_a_third() {
    let mut f = fsm_in(State::OpenSent);
    let a = f.handle(Event::BgpOpen(C1, peer_open(30, Ipv4Addr::new(1, 1, 1, 1))));
    assert!(a.contains(&Action::Send(C1, Outgoing::Keepalive)));
    assert_eq!(
        timer_started(&a, Timer::Hold),
        Some(Duration::from_secs(30))
    );
    assert_eq!(
        timer_started(&a, Timer::Keepalive),
        Some(Duration::from_secs(10))
    );
    assert_eq!(f.negotiated().map(|n| n.hold_time), Some(30));
    // Ours is the smaller one.
    let mut c = cfg();
    c.hold_time = 9;
    let mut f = fsm_in_with(State::OpenSent, c);
    let a = f.handle(Event::BgpOpen(C1, peer_open(90, Ipv4Addr::new(1, 1, 1, 1))));
    assert_eq!(timer_started(&a, Timer::Hold), Some(Duration::from_secs(9)));
    assert_eq!(
        timer_started(&a, Timer::Keepalive),
        Some(Duration::from_secs(3))
    );
}

#[test]
fn hold_time_zero_disables_keepalives_and_the_hold_timer() {
    let mut f = fsm_in(State::OpenSent);
    let a = f.handle(Event::BgpOpen(C1, peer_open(0, Ipv4Addr::new(1, 1, 1, 1))));
    assert_eq!(timer_started(&a, Timer::Hold), None);
    assert_eq!(timer_started(&a, Timer::Keepalive), None);
    assert!(a.contains(&Action::StopTimer(Timer::Hold)));
    let a = f.handle(Event::KeepAliveMsg(C1));
    assert_eq!(f.state(), State::Established);
    assert_eq!(timer_started(&a, Timer::Hold), None);
    let a = f.handle(Event::KeepAliveMsg(C1));
    assert!(a.is_empty(), "{a:?}");
}

#[test]
fn hold_times_of_one_and_two_seconds_are_refused() {
    for hold in [1u16, 2] {
        let mut f = fsm_in(State::OpenSent);
        let mut o = good_open();
        o.hold_time = hold;
        let a = f.handle(Event::BgpOpen(C1, o));
        assert_eq!(
            sent_notification(&a),
            Some(&notif(code::OPEN_MESSAGE, subcode::UNACCEPTABLE_HOLD_TIME))
        );
        assert_eq!(f.state(), State::Idle);
    }
}

#[test]
fn wrong_peer_as_is_refused_with_bad_peer_as() {
    let mut f = fsm_in(State::OpenSent);
    let o = Open::new(65099, 90, Ipv4Addr::new(1, 1, 1, 1), vec![]);
    let a = f.handle(Event::BgpOpen(C1, o));
    let n = sent_notification(&a).unwrap();
    assert_eq!(
        (n.code, n.subcode),
        (code::OPEN_MESSAGE, subcode::BAD_PEER_AS)
    );
    assert!(a.iter().any(|x| matches!(x, Action::ConnectionFailed(_))));
}

#[test]
fn ibgp_peer_with_our_router_id_is_refused() {
    let mut c = cfg();
    c.peer_asn = c.local_asn;
    let mut f = fsm_in_with(State::OpenSent, c);
    let o = Open::new(65001, 90, LOCAL_ID, vec![]);
    let a = f.handle(Event::BgpOpen(C1, o));
    let n = sent_notification(&a).unwrap();
    assert_eq!(n.subcode, subcode::BAD_BGP_IDENTIFIER);
}

#[test]
fn four_octet_as_peer_behind_as_trans_is_accepted() {
    let mut c = cfg();
    c.peer_asn = 4_200_000_001;
    let mut f = fsm_in_with(State::OpenSent, c);
    let o = Open::new(4_200_000_001, 90, Ipv4Addr::new(1, 1, 1, 1), vec![]);
    assert_eq!(o.my_as, margay_bgp_wire::AS_TRANS);
    f.handle(Event::BgpOpen(C1, o));
    assert_eq!(f.state(), State::OpenConfirm);
    assert!(f.negotiated().unwrap().ctx.four_octet_as);
}

#[test]
fn two_octet_peer_negotiates_no_four_octet_as_and_ipv4_only() {
    let mut f = fsm_in(State::OpenSent);
    let mut o = Open::new(65002, 90, Ipv4Addr::new(1, 1, 1, 1), vec![]);
    o.capabilities.clear();
    f.handle(Event::BgpOpen(C1, o));
    let n = f.negotiated().unwrap();
    assert!(!n.ctx.four_octet_as);
    assert!(n.families.ipv4_unicast && !n.families.ipv6_unicast);
    assert!(!n.peer_route_refresh);
}

#[test]
fn enhanced_route_refresh_is_negotiated_only_when_both_opens_carry_it() {
    let mut with_err = cfg();
    with_err.capabilities.push(Capability::EnhancedRouteRefresh);
    let mut peer_err = good_open();
    peer_err.capabilities.push(Capability::EnhancedRouteRefresh);
    for (ours, theirs, want) in [
        (with_err.clone(), peer_err.clone(), true),
        (with_err, good_open(), false),
        (cfg(), peer_err, false),
    ] {
        let mut f = fsm_in_with(State::OpenSent, ours);
        f.handle(Event::BgpOpen(C1, theirs));
        let n = f.negotiated().unwrap();
        assert_eq!(n.enhanced_route_refresh, want);
        assert!(n.peer_route_refresh);
    }
}

#[test]
fn keepalive_in_openconfirm_establishes_with_the_negotiated_session() {
    let mut f = fsm_in(State::OpenConfirm);
    let a = f.handle(Event::KeepAliveMsg(C1));
    let n = a
        .iter()
        .find_map(|x| match x {
            Action::Established(n) => Some(n),
            _ => None,
        })
        .expect("Established action");
    assert_eq!(n.conn, C1);
    assert_eq!(n.peer_asn, 65002);
    assert_eq!(n.peer_id, Ipv4Addr::new(10, 0, 0, 9));
    assert!(n.ctx.is_ebgp);
    assert!(n.peer_route_refresh);
    assert_eq!(
        timer_started(&a, Timer::Hold),
        Some(Duration::from_secs(90))
    );
}

#[test]
fn hold_timer_expiry_sends_hold_timer_expired_in_every_state_with_a_connection() {
    for s in [State::OpenSent, State::OpenConfirm, State::Established] {
        let mut f = fsm_in(s);
        let a = f.handle(Event::HoldTimerExpires);
        assert_eq!(
            sent_notification(&a),
            Some(&notif(code::HOLD_TIMER_EXPIRED, 0)),
            "{s:?}"
        );
        assert!(a.contains(&Action::Close(C1)));
        if s == State::Established {
            assert!(a.iter().any(|x| matches!(x, Action::SessionDown(_))));
        } else {
            assert!(a.iter().any(|x| matches!(x, Action::ConnectionFailed(_))));
        }
    }
}

#[test]
fn send_hold_timer_expiry_closes_with_error_code_8() {
    let mut f = fsm_in(State::Established);
    let a = f.handle(Event::SendHoldTimerExpires);
    assert_eq!(
        sent_notification(&a),
        Some(&notif(SEND_HOLD_TIMER_EXPIRED, 0))
    );
    assert!(
        a.contains(&Action::SessionDown(DownReason::NotificationSent(notif(
            8, 0
        ))))
    );
}

#[test]
fn keepalive_timer_sends_keepalive_and_rearms() {
    let mut f = fsm_in(State::Established);
    let a = f.handle(Event::KeepaliveTimerExpires);
    assert_eq!(
        a,
        vec![
            Action::Send(C1, Outgoing::Keepalive),
            Action::StartTimer(Timer::Keepalive, Duration::from_secs(30))
        ]
    );
    let mut f = fsm_in(State::OpenConfirm);
    let a = f.handle(Event::KeepaliveTimerExpires);
    assert!(a.contains(&Action::Send(C1, Outgoing::Keepalive)));
}

#[test]
fn updates_and_keepalives_restart_the_hold_timer_in_established() {
    for e in [
        Event::KeepAliveMsg(C1),
        Event::UpdateMsg(C1),
        Event::RouteRefreshMsg(C1),
    ] {
        let mut f = fsm_in(State::Established);
        let a = f.handle(e);
        assert_eq!(
            a,
            vec![Action::StartTimer(Timer::Hold, Duration::from_secs(90))]
        );
    }
}

#[test]
fn unexpected_messages_are_fsm_errors_with_rfc_6608_subcodes() {
    let cases = [
        (State::OpenSent, Event::KeepAliveMsg(C1), 1),
        (State::OpenSent, Event::UpdateMsg(C1), 1),
        (State::OpenSent, Event::RouteRefreshMsg(C1), 1),
        (State::OpenConfirm, Event::BgpOpen(C1, good_open()), 2),
        (State::OpenConfirm, Event::UpdateMsg(C1), 2),
        (State::Established, Event::BgpOpen(C1, good_open()), 3),
    ];
    for (s, e, sub) in cases {
        let mut f = fsm_in(s);
        let a = f.handle(e.clone());
        assert_eq!(
            sent_notification(&a),
            Some(&notif(code::FSM, sub)),
            "{s:?} {e:?}"
        );
        assert_eq!(f.state(), State::Idle);
    }
}

#[test]
fn notification_received_takes_the_session_down_with_its_reason() {
    let mut f = fsm_in(State::Established);
    let n = Notification::shutdown(2, "maintenance");
    let a = f.handle(Event::NotifMsg(C1, n.clone()));
    assert!(
        a.contains(&Action::SessionDown(DownReason::NotificationReceived(
            n.clone()
        )))
    );
    assert!(
        sent_notification(&a).is_none(),
        "never answer a NOTIFICATION with one"
    );
    assert_eq!(f.last_error(), Some(&DownReason::NotificationReceived(n)));
    assert_eq!(
        timer_started(&a, Timer::IdleHold),
        Some(Duration::from_secs(1))
    );
}

#[test]
fn update_error_sends_its_notification() {
    let mut f = fsm_in(State::Established);
    let n = notif(3, 11);
    let a = f.handle(Event::UpdateMsgErr(C1, n.clone()));
    assert_eq!(sent_notification(&a), Some(&n));
    assert!(a.contains(&Action::SessionDown(DownReason::NotificationSent(n))));
}

#[test]
fn connection_loss_in_established_allows_graceful_restart() {
    let mut f = fsm_in(State::Established);
    let a = f.handle(Event::TcpConnectionFails(C1));
    let reason = a
        .iter()
        .find_map(|x| match x {
            Action::SessionDown(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap();
    assert!(reason.allows_graceful_restart());
    assert!(!DownReason::NotificationReceived(notif(6, 2)).allows_graceful_restart());
}

#[test]
fn manual_stop_sends_administrative_shutdown_with_the_message_and_stays_down() {
    let mut f = fsm_in(State::Established);
    let a = f.handle(Event::ManualStop {
        message: "rebooting rr1".into(),
    });
    let n = sent_notification(&a).unwrap();
    assert_eq!(
        (n.code, n.subcode),
        (code::CEASE, cease::ADMINISTRATIVE_SHUTDOWN)
    );
    assert_eq!(n.shutdown_communication(), Some("rebooting rr1"));
    assert!(a.iter().any(|x| matches!(x, Action::SessionDown(_))));
    assert_eq!(timer_started(&a, Timer::IdleHold), None);
    // An IdleHold expiry that raced the stop does not restart it.
    assert!(f.handle(Event::IdleHoldTimerExpires).is_empty());
    assert!(f.handle(Event::AutomaticStart).is_empty());
    assert_eq!(f.state(), State::Idle);
}

#[test]
fn manual_stop_in_idle_cancels_a_pending_restart() {
    let mut f = fsm_in(State::Established);
    f.handle(Event::HoldTimerExpires);
    let a = f.handle(Event::ManualStop {
        message: String::new(),
    });
    assert_eq!(a, vec![Action::StopTimer(Timer::IdleHold)]);
    assert!(f.handle(Event::IdleHoldTimerExpires).is_empty());
}

#[test]
fn a_peer_that_keeps_refusing_us_is_retried_with_growing_back_off() {
    let mut f = Fsm::new(cfg());
    f.handle(Event::ManualStart);
    let mut waits = Vec::new();
    for _ in 0..10 {
        f.handle(Event::TcpCrAcked(C1));
        let a = f.handle(Event::NotifMsg(C1, notif(2, 2)));
        let wait = timer_started(&a, Timer::IdleHold).expect("restart is delayed");
        waits.push(wait.as_secs());
        assert_eq!(f.state(), State::Idle);
        // The driver delivers the start when the IdleHold timer fires.
        assert!(f.handle(Event::AutomaticStart).contains(&Action::Connect));
        f.handle(Event::TcpConnectionFails(ConnId(0)));
        f.handle(Event::ConnectRetryTimerExpires);
    }
    assert_eq!(waits, vec![1, 2, 4, 8, 16, 32, 64, 120, 120, 120]);
}

#[test]
fn back_off_resets_once_a_session_has_been_stable() {
    let mut f = Fsm::new(cfg());
    f.handle(Event::ManualStart);
    for _ in 0..4 {
        f.handle(Event::TcpCrAcked(C1));
        f.handle(Event::NotifMsg(C1, notif(6, 0)));
        f.handle(Event::IdleHoldTimerExpires);
    }
    assert_eq!(f.failures(), 4);
    f.handle(Event::TcpCrAcked(C1));
    f.handle(Event::BgpOpen(C1, good_open()));
    f.handle(Event::KeepAliveMsg(C1));
    for _ in 0..3 {
        f.handle(Event::KeepAliveMsg(C1));
    }
    assert_eq!(f.failures(), 0);
    let a = f.handle(Event::TcpConnectionFails(C1));
    assert_eq!(
        timer_started(&a, Timer::IdleHold),
        Some(Duration::from_secs(1))
    );
}

#[test]
fn automatic_stop_sends_its_notification_and_restarts_after_back_off() {
    let mut f = fsm_in(State::Established);
    let n = Notification::error(code::CEASE, cease::MAX_PREFIXES, vec![0, 1, 1, 0, 0, 0, 10]);
    let a = f.handle(Event::AutomaticStop(n.clone()));
    assert_eq!(sent_notification(&a), Some(&n));
    assert!(timer_started(&a, Timer::IdleHold).is_some());
    let a = f.handle(Event::IdleHoldTimerExpires);
    assert!(a.contains(&Action::Connect));
}

// ----- connection collision (§6.8) -----

#[test]
fn collision_keeps_the_connection_opened_by_the_higher_identifier() {
    // Peer's identifier is higher: keep the peer's (inbound) connection.
    let mut f = fsm_in(State::OpenSent);
    let a = f.handle(Event::TcpConnectionConfirmed(C2));
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Send(C2, Outgoing::Open(_)))));
    let high = peer_open(90, Ipv4Addr::new(10, 0, 0, 200));
    let a = f.handle(Event::BgpOpen(C2, high.clone()));
    let cease7 = notif(code::CEASE, cease::CONNECTION_COLLISION_RESOLUTION);
    assert!(a.contains(&Action::Send(C1, Outgoing::Notification(cease7.clone()))));
    assert!(a.contains(&Action::Close(C1)));
    assert_eq!(f.connection(), Some(C2));
    assert_eq!(f.state(), State::OpenConfirm);

    // Peer's identifier is lower: keep ours (outbound), close the peer's.
    let mut f = fsm_in(State::OpenSent);
    f.handle(Event::TcpConnectionConfirmed(C2));
    let low = peer_open(90, Ipv4Addr::new(10, 0, 0, 1));
    let a = f.handle(Event::BgpOpen(C2, low.clone()));
    assert!(a.contains(&Action::Send(C2, Outgoing::Notification(cease7))));
    assert!(a.contains(&Action::Close(C2)));
    assert_eq!(f.connection(), Some(C1));
    assert_eq!(f.state(), State::OpenSent);
    f.handle(Event::BgpOpen(C1, low));
    assert_eq!(f.state(), State::OpenConfirm);
}

#[test]
fn collision_detected_in_openconfirm() {
    let mut f = fsm_in(State::OpenSent);
    f.handle(Event::BgpOpen(
        C1,
        peer_open(90, Ipv4Addr::new(10, 0, 0, 200)),
    ));
    assert_eq!(f.state(), State::OpenConfirm);
    f.handle(Event::TcpConnectionConfirmed(C2));
    let a = f.handle(Event::BgpOpen(
        C2,
        peer_open(90, Ipv4Addr::new(10, 0, 0, 200)),
    ));
    // Higher peer id: its inbound connection wins over our outbound C1.
    assert!(a.contains(&Action::Close(C1)));
    assert_eq!(f.connection(), Some(C2));
    assert_eq!(f.state(), State::OpenConfirm);
    let a = f.handle(Event::KeepAliveMsg(C2));
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Established(n) if n.conn == C2)));
}

#[test]
fn primary_failing_hands_over_to_the_candidate() {
    let mut f = fsm_in(State::OpenSent);
    f.handle(Event::TcpConnectionConfirmed(C2));
    let a = f.handle(Event::TcpConnectionFails(C1));
    assert!(a.contains(&Action::Close(C1)));
    assert_eq!(f.connection(), Some(C2));
    f.handle(Event::BgpOpen(C2, good_open()));
    assert_eq!(f.state(), State::OpenConfirm);
}

#[test]
fn a_third_connection_is_refused() {
    let mut f = fsm_in(State::OpenSent);
    f.handle(Event::TcpConnectionConfirmed(C2));
    let a = f.handle(Event::TcpConnectionConfirmed(ConnId(3)));
    assert_eq!(a, vec![Action::Close(ConnId(3))]);
}

#[test]
fn connection_colliding_with_established_is_closed() {
    let mut f = fsm_in(State::Established);
    let a = f.handle(Event::TcpConnectionConfirmed(C2));
    assert_eq!(
        a,
        vec![
            Action::Send(
                C2,
                Outgoing::Notification(notif(code::CEASE, cease::CONNECTION_COLLISION_RESOLUTION))
            ),
            Action::Close(C2)
        ]
    );
    assert_eq!(f.state(), State::Established);
}

#[test]
fn graceful_restart_peer_reconnecting_replaces_the_old_session() {
    let mut c = cfg();
    let gr = GracefulRestart {
        restart_flags: 0,
        restart_time: 120,
        families: vec![GracefulRestartFamily {
            afi: 1,
            safi: 1,
            flags: 0x80,
        }],
    };
    c.capabilities.push(Capability::GracefulRestart(gr.clone()));
    let mut f = Fsm::new(c);
    f.handle(Event::ManualStart);
    f.handle(Event::TcpCrAcked(C1));
    let mut o = good_open();
    o.capabilities.push(Capability::GracefulRestart(gr));
    f.handle(Event::BgpOpen(C1, o));
    f.handle(Event::KeepAliveMsg(C1));
    assert!(f.negotiated().unwrap().peer_graceful_restart.is_some());
    let a = f.handle(Event::TcpConnectionConfirmed(C2));
    assert!(a.contains(&Action::Close(C1)));
    assert!(a.contains(&Action::SessionDown(DownReason::PeerRestarted)));
    assert!(a
        .iter()
        .any(|x| matches!(x, Action::Send(C2, Outgoing::Open(_)))));
    assert_eq!(f.state(), State::OpenSent);
    assert_eq!(f.connection(), Some(C2));
}

#[test]
fn idle_refuses_connections() {
    let mut f = Fsm::new(cfg());
    assert_eq!(
        f.handle(Event::TcpConnectionConfirmed(C2)),
        vec![Action::Close(C2)]
    );
}

#[test]
fn messages_on_an_unknown_connection_are_ignored() {
    for s in [State::OpenSent, State::OpenConfirm, State::Established] {
        let mut f = fsm_in(s);
        for e in [
            Event::KeepAliveMsg(ConnId(42)),
            Event::UpdateMsg(ConnId(42)),
            Event::NotifMsg(ConnId(42), notif(6, 2)),
            Event::TcpConnectionFails(ConnId(42)),
        ] {
            f.handle(e);
            assert_eq!(f.state(), s);
        }
    }
}

#[test]
fn families_are_the_intersection_of_both_opens() {
    let mut ours = Open::new(1, 90, LOCAL_ID, vec![]);
    ours.capabilities = vec![
        Capability::Multiprotocol { afi: 1, safi: 1 },
        Capability::Multiprotocol { afi: 2, safi: 1 },
    ];
    let mut theirs = ours.clone();
    theirs.capabilities = vec![Capability::Multiprotocol { afi: 2, safi: 1 }];
    let f = negotiate_families(&ours, &theirs);
    assert!(!f.ipv4_unicast && f.ipv6_unicast);
}
