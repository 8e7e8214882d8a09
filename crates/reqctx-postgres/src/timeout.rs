//! Which `statement_timeout` a session should have for a statement, given what we last
//! set on it. Pure logic, no I/O.

use std::time::Duration;

/// What we know of the session's `statement_timeout`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Known {
    /// The session's own default (what `RESET` gives): as connected, or reset by us.
    Default,
    /// A value we set, in milliseconds.
    Ms(u64),
    /// A `SET` failed, or a transaction that may have set it was rolled back.
    Unknown,
}

/// A `SET` to send before the statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Set {
    Default,
    Ms(u64),
    /// Transaction-local: ends with the transaction, or at once outside one.
    Local(u64),
}

impl Set {
    pub(crate) fn sql(self) -> String {
        match self {
            Set::Default => "SET statement_timeout TO DEFAULT".to_owned(),
            Set::Ms(ms) => format!("SET statement_timeout = {ms}"),
            // `set_config(.., true)` rather than `SET LOCAL`: no warning outside a
            // transaction block, where it is a no-op.
            Set::Local(ms) => format!("SELECT set_config('statement_timeout', '{ms}', true)"),
        }
    }

    pub(crate) fn known(self) -> Known {
        match self {
            Set::Default => Known::Default,
            Set::Ms(ms) => Known::Ms(ms),
            Set::Local(_) => Known::Unknown,
        }
    }
}

/// The largest value PostgreSQL accepts (an `int` of milliseconds, about 24.8 days).
const MAX_MS: u64 = i32::MAX as u64;

/// The transaction-local `SET` for a statement with `remaining` to run: sent with every
/// statement that has a deadline shorter than the session's own limit.
pub(crate) fn local(remaining: Option<Duration>, baseline_ms: u64) -> Option<Set> {
    let ms = budget_ms(remaining?);
    (ms <= MAX_MS && (baseline_ms == 0 || ms < baseline_ms)).then_some(Set::Local(ms))
}

/// The budget in whole milliseconds, rounded up (the server's clock starts after ours,
/// so it fires after our deadline), never 0 (which means no limit).
fn budget_ms(r: Duration) -> u64 {
    let ms = r.as_nanos().div_ceil(1_000_000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// The `SET` needed so that the statement runs under a `statement_timeout` no longer than
/// `remaining` (and no longer than the session's own default, `baseline_ms`, 0 = none),
/// or `None` if what the session has is already right: a cached value within
/// `[remaining, remaining + tolerance]`, or the default when there is no budget.
pub(crate) fn plan(
    known: Known,
    remaining: Option<Duration>,
    baseline_ms: u64,
    tolerance: Duration,
) -> Option<Set> {
    let budget_ms = remaining.map(budget_ms);
    let want_default = match budget_ms {
        None => true,
        // The session's own limit is already no longer than the budget: keep it, never lift it.
        Some(ms) => (baseline_ms != 0 && baseline_ms <= ms) || ms > MAX_MS,
    };
    if want_default {
        return (known != Known::Default).then_some(Set::Default);
    }
    let ms = budget_ms.unwrap_or(1);
    let tol = u64::try_from(tolerance.as_millis()).unwrap_or(u64::MAX);
    let in_range = |v: u64| v >= ms && v <= ms.saturating_add(tol);
    let ok = match known {
        Known::Ms(v) => in_range(v),
        Known::Default => baseline_ms != 0 && in_range(baseline_ms),
        Known::Unknown => false,
    };
    (!ok).then_some(Set::Ms(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TOL: Duration = Duration::from_millis(100);

    fn ms(n: u64) -> Option<Duration> {
        Some(Duration::from_millis(n))
    }

    #[test]
    fn no_deadline_keeps_or_restores_the_default() {
        assert_eq!(plan(Known::Default, None, 0, TOL), None);
        assert_eq!(plan(Known::Ms(500), None, 0, TOL), Some(Set::Default));
        assert_eq!(plan(Known::Unknown, None, 0, TOL), Some(Set::Default));
    }

    #[test]
    fn a_budget_is_set_once_then_cached_within_tolerance() {
        assert_eq!(plan(Known::Default, ms(1000), 0, TOL), Some(Set::Ms(1000)));
        assert_eq!(plan(Known::Ms(1000), ms(1000), 0, TOL), None);
        assert_eq!(plan(Known::Ms(1000), ms(950), 0, TOL), None);
        assert_eq!(plan(Known::Ms(1000), ms(899), 0, TOL), Some(Set::Ms(899)));
        // A cached value shorter than the budget would kill the statement early.
        assert_eq!(plan(Known::Ms(1000), ms(1001), 0, TOL), Some(Set::Ms(1001)));
        assert_eq!(plan(Known::Unknown, ms(1000), 0, TOL), Some(Set::Ms(1000)));
    }

    #[test]
    fn rounds_up_and_never_sends_zero() {
        let r = Some(Duration::from_micros(1500));
        assert_eq!(plan(Known::Default, r, 0, TOL), Some(Set::Ms(2)));
        let r = Some(Duration::from_nanos(1));
        assert_eq!(plan(Known::Default, r, 0, TOL), Some(Set::Ms(1)));
    }

    #[test]
    fn never_lifts_the_sessions_own_limit() {
        // A DBA's 30 s beats a 60 s budget.
        assert_eq!(plan(Known::Default, ms(60_000), 30_000, TOL), None);
        assert_eq!(
            plan(Known::Ms(100), ms(60_000), 30_000, TOL),
            Some(Set::Default)
        );
        // A budget shorter than the DBA's limit is set.
        assert_eq!(
            plan(Known::Default, ms(1_000), 30_000, TOL),
            Some(Set::Ms(1_000))
        );
        // The default already fits in the window.
        assert_eq!(plan(Known::Default, ms(29_950), 30_000, TOL), None);
    }

    #[test]
    fn huge_budgets_mean_the_default() {
        let r = Some(Duration::from_secs(40 * 86_400));
        assert_eq!(plan(Known::Default, r, 0, TOL), None);
        assert_eq!(
            plan(Known::Ms(5), Some(Duration::MAX), 0, TOL),
            Some(Set::Default)
        );
    }

    #[test]
    fn a_local_budget_is_sent_when_shorter_than_the_sessions_limit() {
        assert_eq!(local(None, 0), None);
        assert_eq!(local(ms(200), 0), Some(Set::Local(200)));
        assert_eq!(local(ms(200), 100), None);
        assert_eq!(local(Some(Duration::MAX), 0), None);
        assert_eq!(
            Set::Local(200).sql(),
            "SELECT set_config('statement_timeout', '200', true)"
        );
    }

    #[test]
    fn sql() {
        assert_eq!(Set::Ms(250).sql(), "SET statement_timeout = 250");
        assert_eq!(Set::Default.sql(), "SET statement_timeout TO DEFAULT");
    }
}
