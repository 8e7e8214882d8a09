//! `Context::bind` and `Context::bind_try`, on tokio's paused clock.
#![cfg(feature = "stream")]

use std::future::poll_fn;
use std::pin::{Pin, pin};
use std::task::{Context as Cx, Poll};
use std::time::Duration;

use futures_core::{FusedStream, Stream};
use reqctx::{Cancelled, Cause, Context, DeadlineOrigin};
use tokio::time::{Instant, Interval, interval};

/// A tick every `period` (the first at once), numbered from 0; ends after `limit` ticks.
struct Ticks {
    interval: Interval,
    next: u32,
    limit: u32,
}

fn ticks(period: Duration, limit: u32) -> Ticks {
    Ticks {
        interval: interval(period),
        next: 0,
        limit,
    }
}

impl Stream for Ticks {
    type Item = u32;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Cx<'_>) -> Poll<Option<u32>> {
        if self.next == self.limit {
            return Poll::Ready(None);
        }
        self.interval.poll_tick(cx).map(|_| {
            self.next += 1;
            Some(self.next - 1)
        })
    }
}

/// Always ready, forever.
struct Ready;

impl Stream for Ready {
    type Item = Result<u32, Cancelled>;

    fn poll_next(self: Pin<&mut Self>, _: &mut Cx<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(Some(Ok(7)))
    }
}

async fn next<S: Stream>(mut stream: Pin<&mut S>) -> Option<S::Item> {
    poll_fn(|cx| stream.as_mut().poll_next(cx)).await
}

async fn collect<S: Stream>(mut stream: Pin<&mut S>) -> Vec<S::Item> {
    let mut items = Vec::new();
    while let Some(item) = next(stream.as_mut()).await {
        items.push(item);
    }
    items
}

#[tokio::test(start_paused = true)]
async fn bind_ends_the_stream_at_the_deadline() {
    let start = Instant::now();
    let (ctx, _cancel) = Context::background().with_timeout(Duration::from_millis(350));
    let mut bound = pin!(ctx.bind(ticks(Duration::from_millis(100), u32::MAX)));
    assert_eq!(collect(bound.as_mut()).await, vec![0, 1, 2, 3]);
    assert_eq!(start.elapsed(), Duration::from_millis(350));
    assert_eq!(
        bound.cause(),
        Some(Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Code
        })
    );
    assert!(bound.is_terminated());
    assert_eq!(next(bound.as_mut()).await, None);
}

#[tokio::test(start_paused = true)]
async fn bind_ends_when_cancelled_with_the_cause() {
    let (ctx, cancel) = Context::background().with_cancel();
    let mut bound = pin!(ctx.bind(ticks(Duration::from_millis(100), u32::MAX)));
    assert_eq!(next(bound.as_mut()).await, Some(0));
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        cancel.cancel_with(Cause::ClientDisconnected);
    });
    assert_eq!(next(bound.as_mut()).await, Some(1));
    assert_eq!(next(bound.as_mut()).await, None);
    assert_eq!(bound.cause(), Some(Cause::ClientDisconnected));
}

#[tokio::test(start_paused = true)]
async fn a_stream_that_ends_by_itself_ends_without_a_cause() {
    let (ctx, cancel) = Context::background().with_cancel();
    let mut bound = pin!(ctx.bind(ticks(Duration::from_millis(10), 3)));
    assert_eq!(collect(bound.as_mut()).await, vec![0, 1, 2]);
    cancel.cancel();
    assert_eq!(bound.cause(), None);

    let (ctx, cancel) = Context::background().with_cancel();
    let stream = ticks(Duration::from_millis(10), 2).map_ok();
    let mut bound = pin!(ctx.bind_try(stream));
    let items = collect(bound.as_mut()).await;
    assert_eq!(items.len(), 2);
    assert!(items.iter().all(Result::is_ok));
    cancel.cancel();
    assert_eq!(bound.cause(), None);
}

#[tokio::test(start_paused = true)]
async fn bind_try_yields_the_cause_as_its_last_item() {
    let (ctx, _cancel) = Context::background().with_timeout(Duration::from_millis(250));
    let mut bound = pin!(ctx.bind_try(ticks(Duration::from_millis(100), u32::MAX).map_ok()));
    let items = collect(bound.as_mut()).await;
    assert_eq!(items.len(), 4);
    assert!(items[..3].iter().all(Result::is_ok));
    let err = items[3].as_ref().unwrap_err();
    assert_eq!(
        err.cause(),
        &Cause::DeadlineExceeded {
            origin: DeadlineOrigin::Code
        }
    );
    assert!(bound.is_terminated());
    assert_eq!(next(bound.as_mut()).await.map(|r| r.is_ok()), None);
}

#[tokio::test(start_paused = true)]
async fn cancellation_wins_over_a_ready_item() {
    let (ctx, cancel) = Context::background().with_cancel();
    let mut bound = pin!(ctx.bind_try(Ready));
    assert_eq!(next(bound.as_mut()).await.unwrap().unwrap(), 7);
    cancel.cancel_with(Cause::Shutdown);
    let err = next(bound.as_mut()).await.unwrap().unwrap_err();
    assert_eq!(err.cause(), &Cause::Shutdown);
    assert!(next(bound.as_mut()).await.is_none());
}

#[tokio::test(start_paused = true)]
async fn a_context_cancelled_before_the_first_poll_yields_nothing() {
    let (ctx, cancel) = Context::background().with_cancel();
    cancel.cancel();
    let mut bound = pin!(ctx.bind(ticks(Duration::from_millis(1), u32::MAX)));
    assert_eq!(next(bound.as_mut()).await, None);
    assert_eq!(bound.cause(), Some(Cause::Cancelled));
    // The stream was never polled.
    assert_eq!(bound.get_ref().next, 0);
}

/// `Ok` every item.
struct MapOk<S>(S);

impl<S: Stream + Unpin> Stream for MapOk<S> {
    type Item = Result<S::Item, Cancelled>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Cx<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.0).poll_next(cx).map(|item| item.map(Ok))
    }
}

trait MapOkExt: Sized {
    fn map_ok(self) -> MapOk<Self> {
        MapOk(self)
    }
}

impl<S: Stream> MapOkExt for S {}
