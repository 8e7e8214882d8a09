//! A lazy `DeadlineDriver` (`Context::driven`): what it records before its context is made
//! is what the context has once made, and it decides between its parent's cause and its
//! own deadline as a node would.

use std::time::Duration;

use reqctx::{Cause, Context, DeadlineOrigin};
use tokio::time::{Instant, advance};

#[test]
fn a_cause_recorded_before_birth_is_the_contexts() {
    let driver = Context::background().driven(None);
    assert!(!driver.is_born());
    assert!(driver.cancel_with(Cause::Completed));
    assert!(
        !driver.cancel_with(Cause::ClientDisconnected),
        "the first cause wins"
    );
    let ctx = driver.context();
    assert!(driver.is_born());
    assert_eq!(ctx.cause(), Some(Cause::Completed));
    assert_eq!(driver.expire(), Some(Cause::Completed));
}

#[test]
fn values_and_deadline_set_before_birth_are_the_contexts() {
    #[derive(Debug, PartialEq)]
    struct User(&'static str);
    let parent = Context::background().with_value(7u8);
    let mut driver = parent.driven(None);
    driver.with_value(User("alice"));
    let at = Instant::now() + Duration::from_secs(5);
    driver.set_deadline(Some((at, DeadlineOrigin::Query)));
    let ctx = driver.context();
    assert_eq!(ctx.value::<User>(), Some(&User("alice")));
    assert_eq!(ctx.value::<u8>(), Some(&7));
    assert_eq!(ctx.deadline(), Some(at));
    assert_eq!(ctx.deadline_origin(), Some(DeadlineOrigin::Query));
    // After birth the deadline moves for the context handed out.
    let later = at + Duration::from_secs(5);
    driver.set_deadline(Some((later, DeadlineOrigin::Layer)));
    assert_eq!(ctx.deadline(), Some(later));
}

#[tokio::test(start_paused = true)]
async fn a_parent_cancelled_after_the_deadline_passed_loses_to_it() {
    let (conn, disconnect) = Context::background().with_cancel();
    let at = Instant::now() + Duration::from_millis(100);
    let driver = conn.driven(Some((at, DeadlineOrigin::Layer)));
    advance(Duration::from_millis(150)).await; // the deadline passes, nobody looks
    disconnect.cancel_with(Cause::ClientDisconnected);
    // The deadline passed first: it is the cause, before and after birth.
    assert_eq!(
        driver.expire(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Layer
        })
    );
    assert_eq!(
        driver.context().cause(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Layer
        })
    );
}

#[tokio::test(start_paused = true)]
async fn a_parent_cancelled_before_the_deadline_wins_read_after_it() {
    let (conn, disconnect) = Context::background().with_cancel();
    let at = Instant::now() + Duration::from_millis(100);
    let driver = conn.driven(Some((at, DeadlineOrigin::Layer)));
    advance(Duration::from_millis(50)).await;
    disconnect.cancel_with(Cause::ClientDisconnected);
    advance(Duration::from_millis(100)).await; // read only once the deadline has passed too
    assert!(!driver.cancel_with(Cause::Completed));
    assert_eq!(driver.expire(), Some(Cause::ClientDisconnected));
    assert_eq!(driver.context().cause(), Some(Cause::ClientDisconnected));
}

#[tokio::test(start_paused = true)]
async fn a_context_made_after_its_deadline_passed_is_cancelled_and_waiters_wake() {
    let at = Instant::now() + Duration::from_millis(100);
    let driver = Context::background().driven(Some((at, DeadlineOrigin::Header)));
    let ctx = driver.context();
    let waiter = tokio::spawn({
        let ctx = ctx.clone();
        async move { ctx.cancelled().await }
    });
    advance(Duration::from_millis(100)).await;
    waiter.await.unwrap();
    assert_eq!(
        ctx.cause(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Header
        })
    );
}

#[test]
fn dropping_a_born_driver_cancels_an_unborn_one_leaves_nothing() {
    let driver = Context::background().driven(None);
    let ctx = driver.context();
    drop(driver);
    assert_eq!(ctx.cause(), Some(Cause::Cancelled));
    let (parent, _cancel) = Context::background().with_cancel();
    drop(parent.driven(None));
    assert!(!parent.is_cancelled(), "never up the tree");
}
