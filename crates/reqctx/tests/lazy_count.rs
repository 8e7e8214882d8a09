//! `live_driven_contexts` counts a driven context once, whether or not its node was made,
//! and not after it is gone. Alone in its binary: the count is process-wide.

use reqctx::Context;

#[test]
fn a_driven_context_counts_once_born_or_not() {
    let base = Context::live_driven_contexts();
    let unborn = Context::background().driven(None);
    assert_eq!(Context::live_driven_contexts(), base + 1);
    let born = Context::background().driven(None);
    let ctx = born.context();
    assert_eq!(Context::live_driven_contexts(), base + 2);
    drop(unborn);
    assert_eq!(Context::live_driven_contexts(), base + 1);
    drop(born);
    assert_eq!(
        Context::live_driven_contexts(),
        base + 1,
        "the context still lives"
    );
    drop(ctx);
    assert_eq!(Context::live_driven_contexts(), base);
}
