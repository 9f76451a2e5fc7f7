//! Retrying start-up calls (etcd may not be up yet) with capped exponential backoff, logging
//! each distinct failure once — then every 30 s while it lasts — as one line.

use std::future::Future;
use std::time::Duration;

const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// How often a failure that keeps repeating word for word is logged again.
const REPEAT_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// Runs `op` until it succeeds or fails with an error `fatal` says retrying cannot fix (that
/// error is returned). `describe` makes the log line of a failure.
pub async fn with_backoff<T, E, F, Fut>(
    what: &str,
    describe: impl Fn(&E) -> String,
    fatal: impl Fn(&E) -> bool,
    mut op: F,
) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut delay = RETRY_MIN;
    let mut last: Option<(String, tokio::time::Instant)> = None;
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if fatal(&e) => return Err(e),
            Err(e) => {
                let line = describe(&e);
                let now = tokio::time::Instant::now();
                let repeat = last
                    .as_ref()
                    .is_some_and(|(l, at)| *l == line && now - *at < REPEAT_LOG_INTERVAL);
                if !repeat {
                    log::warn!("{what}: {line}; retrying");
                    last = Some((line, now));
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test]
    async fn retries_until_success_and_stops_at_a_fatal_error() {
        let calls = Cell::new(0);
        let r: Result<u32, &str> = with_backoff(
            "test",
            |e: &&str| e.to_string(),
            |_| false,
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    if n < 3 {
                        Err("not yet")
                    } else {
                        Ok(n)
                    }
                }
            },
        )
        .await;
        assert_eq!(r, Ok(3));
        let r: Result<(), &str> = with_backoff(
            "test",
            |e: &&str| e.to_string(),
            |e| *e == "fatal",
            || async { Err("fatal") },
        )
        .await;
        assert_eq!(r, Err("fatal"));
    }
}
