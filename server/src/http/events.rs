//! `GET /v1/events`: the lock table's events as server-sent events.
//!
//! The stream opens with a `ready` event (the subscription exists from
//! then on, so a client that fetches `/v1/locks` after it misses nothing).
//! With `replay=N`, up to N recent events come first (from
//! [`crate::history`]); each event's `seq` tells the live ones that were
//! already replayed, so none is sent twice or missed.
//! A subscriber that falls more than `EVENT_BACKLOG` events behind gets a
//! `lagged` event with the count it missed, and should re-fetch the state.
//! On shutdown the stream delivers what the drain emitted (holders' `lost`
//! with reason `shutdown`) and ends, so that shutdown is not held up.

use super::App;
use super::error::{ApiError, ErrorBody, Query};
use super::model::{self, EventsQuery};
use crate::auth::Scope;
use crate::locks::{Event, Kind};
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::Stream;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::{broadcast, watch};

/// Follow lock events live.
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "locks",
    params(EventsQuery),
    responses(
        (status = 200, description = "text/event-stream. `event:` is the type (`ready` first, then \
            `queued`, `granted`, `released`, `lost`, `abandoned`, or `lagged` with `{\"missed\": n}`); \
            `data:` is the JSON event", body = model::Event, content_type = "text/event-stream"),
        (status = 400, description = "Bad filter", body = ErrorBody),
        (status = 401, description = "Client tokens are required and none or an unknown one was sent", body = ErrorBody),
    ),
    security((), ("client_token" = [])),
)]
pub async fn events(
    State(app): State<App>,
    Query(q): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let scope = app.access(&headers)?;
    let replay = q.replay.unwrap_or(0) as usize;
    if replay > crate::history::RECENT {
        return Err(ApiError::bad_request(format!(
            "replay must be at most {}",
            crate::history::RECENT
        )));
    }
    let mut follow = Follow {
        scope,
        // Subscribed before the replay is read: nothing falls between.
        events: app.table.subscribe(),
        stop: app.stop.clone(),
        stopping: false,
        ready: false,
        kind: q.kind,
        prefix: q.prefix.unwrap_or_default(),
        replay: Default::default(),
        replayed_to: 0,
        app,
    };
    if replay > 0 {
        let events = follow
            .app
            .metrics
            .history
            .recent(replay, |e| follow.wanted(e));
        follow.replayed_to = events.last().map_or(0, |e| e.seq);
        follow.replay = events.into();
    }
    let stream = futures_util::stream::unfold(follow, |mut follow| async move {
        let event = follow.next().await?;
        Some((Ok(event), follow))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

struct Follow {
    events: broadcast::Receiver<Event>,
    /// Becomes true when padlockd shuts down.
    stop: watch::Receiver<bool>,
    stopping: bool,
    ready: bool,
    kind: Option<Kind>,
    prefix: String,
    /// The names a client token may see (`None`: all).
    scope: Option<Scope>,
    /// Recent events still to send, before `ready`.
    replay: std::collections::VecDeque<Event>,
    /// The last replayed event's `seq`: live events up to it were sent.
    replayed_to: u64,
    app: App,
}

impl Follow {
    fn wanted(&self, event: &Event) -> bool {
        self.kind.is_none_or(|k| k == event.kind)
            && event.name.starts_with(&self.prefix)
            && self.scope.as_ref().is_none_or(|s| s.allows(&event.name))
    }

    async fn next(&mut self) -> Option<SseEvent> {
        if let Some(event) = self.replay.pop_front() {
            return Some(to_sse(&event));
        }
        if !self.ready {
            self.ready = true;
            return Some(
                SseEvent::default()
                    .event("ready")
                    .retry(Duration::from_secs(1))
                    .data("{}"),
            );
        }
        loop {
            let received = if self.stopping {
                // The drain's events are already in the channel: deliver
                // them, then end.
                match self.events.try_recv() {
                    Ok(event) => Ok(event),
                    Err(broadcast::error::TryRecvError::Lagged(n)) => {
                        Err(broadcast::error::RecvError::Lagged(n))
                    }
                    Err(_) => return None,
                }
            } else {
                tokio::select! {
                    biased;
                    received = self.events.recv() => received,
                    _ = self.stop.wait_for(|stop| *stop) => {
                        self.stopping = true;
                        continue;
                    }
                }
            };
            match received {
                Ok(event) if event.seq > self.replayed_to && self.wanted(&event) => {
                    return Some(to_sse(&event));
                }
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    self.app
                        .metrics
                        .sse_lagged
                        .fetch_add(missed, Ordering::Relaxed);
                    return Some(
                        SseEvent::default()
                            .event("lagged")
                            .data(format!("{{\"missed\":{missed}}}")),
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

fn to_sse(event: &Event) -> SseEvent {
    let json = model::Event::from(event);
    let data = serde_json::to_string(&json).unwrap_or_else(|_| "{}".into());
    SseEvent::default()
        .event(json.event_type.as_str())
        .id(event.seq.to_string())
        .data(data)
}
