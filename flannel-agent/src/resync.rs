//! The rhythm shared by the tasks that keep something in place (iptables and nftables rules,
//! the blackhole route): check every period, and at once when our subnet changes.

use std::time::Duration;

use tokio::sync::watch;

pub struct Resync<N> {
    period: Duration,
    subnet: watch::Receiver<N>,
    /// False once the sender is gone: the subnet can no longer change.
    following: bool,
}

impl<N: Copy> Resync<N> {
    pub fn new(period: Duration, subnet: watch::Receiver<N>) -> Self {
        Resync {
            period,
            subnet,
            following: true,
        }
    }

    /// Our subnet now (marks it seen, so only later changes wake [`Resync::next`]).
    pub fn subnet(&mut self) -> N {
        *self.subnet.borrow_and_update()
    }

    /// Wait for the next check: `Some(subnet)` when our subnet changed, `None` when a period
    /// passed.
    pub async fn next(&mut self) -> Option<N> {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.period) => return None,
                changed = self.subnet.changed(), if self.following => {
                    if changed.is_err() {
                        self.following = false;
                        continue;
                    }
                    return Some(*self.subnet.borrow_and_update());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_subnet_change_wakes_at_once_and_a_closed_channel_falls_back_to_the_period() {
        let (tx, rx) = watch::channel(1u8);
        let mut r = Resync::new(Duration::from_secs(5), rx);
        assert_eq!(r.subnet(), 1);
        let start = tokio::time::Instant::now();
        tx.send(2).unwrap();
        assert_eq!(r.next().await, Some(2));
        assert_eq!(start.elapsed(), Duration::ZERO);
        assert_eq!(r.next().await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(tx);
        assert_eq!(r.next().await, None);
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }
}
