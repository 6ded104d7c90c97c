//! A client's position in its topic: the epoch and the last `seq` it received, checked on
//! every delivery, so that a gap (a lost message) or a `seq` seen twice (a duplicate) is
//! counted where it happens.

/// What one client's deliveries showed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    /// Deliveries received (each counted once, duplicates included).
    pub deliveries: u64,
    /// Sequence numbers skipped within an epoch.
    pub lost: u64,
    /// Deliveries of a `seq` already received in the same epoch.
    pub duplicated: u64,
    /// Deliveries of another epoch that no subscribe reply announced.
    pub unannounced_epochs: u64,
}

/// How a subscribe reply placed the client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Placed {
    /// A first subscription (no `since`).
    Fresh,
    /// Recovered: the missed deliveries follow, up to this `seq`.
    Recovering(u64),
    /// Recovery impossible, for this reason: subscribed from the current position.
    Impossible(String),
}

/// The epoch and last `seq` received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// `None` until a reply or delivery names one (cluster mode: a topic without state).
    pub epoch: Option<Box<str>>,
    /// Last `seq` received (or the position subscribed at).
    pub last: u64,
}

impl Position {
    /// A subscribe reply at (`epoch`, `seq`): how the client is placed, and where it now is.
    pub fn subscribed(
        &mut self,
        epoch: Option<&str>,
        seq: u64,
        recovered: Option<bool>,
        reason: Option<&str>,
    ) -> Placed {
        match recovered {
            Some(true) => Placed::Recovering(seq),
            Some(false) => {
                self.epoch = epoch.map(Into::into);
                self.last = seq;
                Placed::Impossible(reason.unwrap_or("no reason given").to_string())
            }
            None => {
                self.epoch = epoch.map(Into::into);
                self.last = seq;
                Placed::Fresh
            }
        }
    }

    /// A delivery of (`epoch`, `seq`).
    pub fn delivery(&mut self, epoch: &str, seq: u64, t: &mut Tally) {
        t.deliveries += 1;
        match &self.epoch {
            Some(e) if **e == *epoch => {
                if seq <= self.last {
                    t.duplicated += 1;
                    return;
                }
                t.lost += seq - self.last - 1;
            }
            Some(_) => {
                // The numbering restarted without a reply saying so: everything before this
                // `seq` of the new epoch was missed.
                t.unannounced_epochs += 1;
                t.lost += seq.saturating_sub(1);
                self.epoch = Some(epoch.into());
            }
            None => {
                // Subscribed to a topic without state (position 0): its epoch starts at 1.
                t.lost += seq.saturating_sub(self.last + 1);
                self.epoch = Some(epoch.into());
            }
        }
        self.last = seq;
    }

    /// Messages of (`epoch`, up to `seq`) the client never received, once the publisher has
    /// stopped: `None` if the client is in another epoch (it did not follow the topic there).
    pub fn behind(&self, epoch: &str, seq: u64) -> Option<u64> {
        match &self.epoch {
            Some(e) if **e == *epoch => Some(seq.saturating_sub(self.last)),
            None => Some(seq.saturating_sub(self.last)),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_duplicates_are_counted_where_they_happen() {
        let mut p = Position::default();
        let mut t = Tally::default();
        assert_eq!(p.subscribed(Some("e1"), 3, None, None), Placed::Fresh);
        for seq in [4, 5, 7, 7, 6, 8] {
            p.delivery("e1", seq, &mut t);
        }
        assert_eq!(t, Tally { deliveries: 6, lost: 1, duplicated: 2, unannounced_epochs: 0 });
        assert_eq!(p.last, 8);
        assert_eq!(p.behind("e1", 10), Some(2));
        assert_eq!(p.behind("e2", 10), None);
    }

    #[test]
    fn recovery_keeps_the_position_and_impossible_recovery_moves_it() {
        let mut p = Position { epoch: Some("e1".into()), last: 5 };
        let mut t = Tally::default();
        assert_eq!(p.subscribed(Some("e1"), 8, Some(true), None), Placed::Recovering(8));
        assert_eq!(p.last, 5);
        for seq in 6..=9 {
            p.delivery("e1", seq, &mut t);
        }
        assert_eq!((t.lost, t.duplicated), (0, 0));
        let why = "epoch changed: the topic's history was reset";
        assert_eq!(p.subscribed(Some("e2"), 2, Some(false), Some(why)), Placed::Impossible(why.into()));
        p.delivery("e2", 3, &mut t);
        assert_eq!((t.lost, p.epoch.as_deref(), p.last), (0, Some("e2"), 3));
    }

    #[test]
    fn an_epoch_nobody_announced_counts_what_came_before_it() {
        let mut p = Position { epoch: Some("e1".into()), last: 5 };
        let mut t = Tally::default();
        p.delivery("e2", 4, &mut t);
        assert_eq!((t.lost, t.unannounced_epochs), (3, 1));
        let mut fresh = Position::default();
        fresh.delivery("e3", 1, &mut t);
        assert_eq!((t.lost, fresh.last), (3, 1));
    }
}
