//! Chains of any depth are cancelled, resolved, waited on and dropped in constant stack.
//!
//! Each test runs on a thread with a 256 KiB stack, where a walk or a drop that recursed
//! once per link would overflow long before the end of these chains.

use std::thread;

use reqctx::{Cause, Context};

const SMALL_STACK: usize = 256 * 1024;

fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::Builder::new()
        .stack_size(SMALL_STACK)
        .spawn(f)
        .unwrap()
        .join()
        .expect("the chain fits in a small stack")
}

/// `depth` nested `with_cancel` under a root whose canceller is returned; every other
/// canceller is disarmed, so the chain is held only by its last context.
fn nested_cancels(depth: usize) -> (Context, reqctx::Canceller) {
    let (root, cancel_root) = Context::background().with_cancel();
    let mut ctx = root;
    for _ in 0..depth {
        let (child, cancel) = ctx.with_cancel();
        cancel.disarm();
        ctx = child;
    }
    (ctx, cancel_root)
}

#[test]
fn a_deep_chain_of_cancels_is_cancelled_and_dropped() {
    on_small_stack(|| {
        let (deepest, cancel_root) = nested_cancels(200_000);
        assert!(!deepest.is_cancelled());
        cancel_root.cancel_with(Cause::Shutdown);
        assert_eq!(deepest.cause(), Some(Cause::Shutdown));
        drop(deepest);
    });
}

#[test]
fn a_deep_chain_of_cancels_is_dropped_uncancelled() {
    on_small_stack(|| {
        let (deepest, cancel_root) = nested_cancels(200_000);
        cancel_root.disarm();
        // Disarmed, the root's canceller ended nothing: the chain is dropped live.
        assert_eq!(deepest.cause(), None);
        drop(deepest);
    });
}

#[test]
fn a_token_at_the_bottom_of_a_deep_chain() {
    on_small_stack(|| {
        let (deepest, cancel_root) = nested_cancels(200_000);
        let token = deepest.token(); // one token per link, made top-down
        assert!(!token.is_cancelled());
        cancel_root.cancel_with(Cause::Completed);
        assert!(token.is_cancelled());
        assert_eq!(deepest.cause(), Some(Cause::Completed));
        drop(deepest);
        drop(token);
    });
}

#[test]
fn a_deep_chain_of_values_is_dropped() {
    on_small_stack(|| {
        let mut ctx = Context::background();
        for i in 0..500_000u32 {
            ctx = ctx.with_value(i);
        }
        assert_eq!(ctx.value::<u32>(), Some(&499_999));
        drop(ctx);
    });
}

#[test]
fn a_shared_middle_keeps_the_chain_above_it() {
    on_small_stack(|| {
        let (middle, cancel_root) = nested_cancels(100_000);
        let middle = middle.with_value(7u8);
        let mut deepest = middle.clone();
        for _ in 0..100_000 {
            let (child, cancel) = deepest.with_cancel();
            cancel.disarm();
            deepest = child.with_value(1u16);
        }
        drop(deepest); // unlinks up to `middle`, which is still held
        assert_eq!(middle.value::<u8>(), Some(&7));
        cancel_root.cancel();
        assert_eq!(middle.cause(), Some(Cause::Cancelled));
    });
}
