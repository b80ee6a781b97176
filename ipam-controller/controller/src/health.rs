//! What `/livez` and `/readyz` answer: readiness from the replica's role and whether it can
//! reach the datastore, liveness from the main loop's progress.
//!
//! - Ready: the last datastore exchange of the main loop (a leadership attempt, a renewal or a
//!   pass) succeeded, and the replica either leads or is a standby following the leader (its
//!   last attempt found the lease held by another replica). Not ready while connecting, while
//!   the datastore fails, and after a pass failed until one succeeds.
//! - Live: the main loop finished an iteration (an attempt to lead, or a renewal with its
//!   pass) within the stall limit. A pass or an attempt that hangs stops it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The replica's part in leader election.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not yet connected, or no leadership attempt has completed.
    Starting,
    /// Another replica holds the lease; this one tries again.
    Standby,
    Leader,
}

#[derive(Debug)]
struct State {
    role: Role,
    /// What went wrong in the main loop's last iteration (a failed exchange with the
    /// datastore, a failed pass).
    problem: Result<(), String>,
    heartbeat: Instant,
}

/// Shared between the main loop, which reports, and the HTTP endpoints, which answer.
#[derive(Debug)]
pub struct Health {
    state: Mutex<State>,
    stall_limit: Duration,
}

impl Health {
    /// `stall_limit`: how long the main loop may go without finishing an iteration and still be
    /// live.
    pub fn new(stall_limit: Duration) -> Health {
        Health {
            state: Mutex::new(State {
                role: Role::Starting,
                problem: Err("connecting to the datastore".into()),
                heartbeat: Instant::now(),
            }),
            stall_limit,
        }
    }

    /// The limit `main` uses: three pass intervals or three lease durations, whichever is
    /// longer, and at least a minute.
    pub fn stall_limit_for(interval: Duration, lease: Duration) -> Duration {
        (interval * 3).max(lease * 3).max(Duration::from_secs(60))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The main loop finished an iteration in `role`; `problem` is what went wrong in it.
    pub fn report(&self, role: Role, problem: Result<(), String>) {
        let mut st = self.lock();
        st.role = role;
        st.problem = problem;
        st.heartbeat = Instant::now();
    }

    pub fn role(&self) -> Role {
        self.lock().role
    }

    /// `Ok(what)` when ready, else why not.
    pub fn ready(&self) -> Result<&'static str, String> {
        let st = self.lock();
        if let Err(e) = &st.problem {
            return Err(e.clone());
        }
        match st.role {
            Role::Starting => Err("no leadership attempt has completed yet".into()),
            Role::Standby => Ok("standby, following the leader"),
            Role::Leader => Ok("leader"),
        }
    }

    /// `Ok` while the main loop makes progress, else for how long it has not.
    pub fn live(&self) -> Result<(), String> {
        let since = self.lock().heartbeat.elapsed();
        if since > self.stall_limit {
            Err(format!(
                "the main loop has not finished an iteration for {} s (limit {} s)",
                since.as_secs(),
                self.stall_limit.as_secs()
            ))
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_needs_a_role_and_the_datastore() {
        let h = Health::new(Duration::from_secs(60));
        assert!(h.ready().unwrap_err().contains("connecting"));
        h.report(Role::Standby, Ok(()));
        assert_eq!(h.ready(), Ok("standby, following the leader"));
        h.report(Role::Leader, Err("etcd unreachable".into()));
        assert_eq!(h.ready(), Err("etcd unreachable".into()));
        h.report(Role::Leader, Ok(()));
        assert_eq!(h.ready(), Ok("leader"));
    }

    #[test]
    fn live_fails_once_the_loop_stalls() {
        let h = Health::new(Duration::from_millis(30));
        assert!(h.live().is_ok());
        std::thread::sleep(Duration::from_millis(60));
        assert!(h.live().unwrap_err().contains("has not finished"));
        h.report(Role::Standby, Ok(()));
        assert!(h.live().is_ok());
    }
}
