//! The listening thread: subscribed to the channels of the topics this node has local
//! subscribers for, it forwards their messages as they come.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::forward::split_exclusion;
use super::scripts::keys;
use super::topology::{COMMAND_TIMEOUT, command_connection, connection_lost};
use super::{CONTROL_CHANNEL, Shared};

/// How long the broker waits for channel messages before it looks at its requests again.
pub(super) const POLL: Duration = Duration::from_millis(2);

/// Orders for the listening thread.
pub(super) enum Listen {
    /// Subscribe to a topic's channel; the answer says when Redis confirmed it.
    Subscribe(String, Sender<redis::RedisResult<()>>),
    /// Stop listening to a topic's channel.
    Unsubscribe(String),
}

/// The thread that owns the subscribed connection: it forwards messages as they come.
pub(super) struct Listener {
    pub(super) client: redis::Client,
    pub(super) shared: Arc<Shared>,
    pub(super) ctl: Receiver<Listen>,
}

impl Listener {
    pub(super) fn run(self) {
        let mut backoff = Duration::from_millis(100);
        let mut connected_once = false;
        loop {
            match self.connect() {
                Ok((mut sub, mut cmd)) => {
                    if connected_once {
                        self.shared.status.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected_once = true;
                    backoff = Duration::from_millis(100);
                    let mut pubsub = sub.as_pubsub();
                    let _ = pubsub.set_read_timeout(Some(POLL));
                    match self.serve(&mut pubsub, &mut cmd) {
                        Ok(()) => return,
                        Err(e) => tracing::warn!("broker: Redis subscription lost: {e}"),
                    }
                    self.shared.set_up(true, false);
                }
                Err(e) => tracing::debug!("broker: cannot reach Redis: {e}"),
            }
            let until = Instant::now() + backoff;
            while Instant::now() < until {
                match self.ctl.recv_timeout(until.saturating_duration_since(Instant::now())) {
                    Ok(Listen::Subscribe(_, ack)) => {
                        let _ = ack.send(Err(std::io::Error::other("Redis is unreachable").into()));
                    }
                    Ok(Listen::Unsubscribe(_)) | Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => return,
                }
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    pub(super) fn connect(&self) -> redis::RedisResult<(redis::Connection, redis::Connection)> {
        let sub = self.client.get_connection_with_timeout(COMMAND_TIMEOUT)?;
        sub.set_write_timeout(Some(COMMAND_TIMEOUT))?;
        Ok((sub, command_connection(&self.client)?))
    }

    pub(super) fn serve(
        &self,
        pubsub: &mut redis::PubSub<'_>,
        cmd: &mut redis::Connection,
    ) -> redis::RedisResult<()> {
        {
            // After a reconnect: listen again, then forward what was missed meanwhile.
            let mut topics = self.shared.topics();
            let names: Vec<String> = topics.keys().cloned().collect();
            // Confirmations take a round trip: not the short poll timeout.
            pubsub.set_read_timeout(Some(COMMAND_TIMEOUT))?;
            let mut channels: Vec<String> = names.iter().map(|t| keys(t).3).collect();
            channels.push(CONTROL_CHANNEL.to_string());
            pubsub.subscribe(channels)?;
            pubsub.set_read_timeout(Some(POLL))?;
            for topic in &names {
                match self.shared.catch_up(cmd, &mut topics, topic) {
                    Err(e) if connection_lost(&e) => return Err(e),
                    // One topic whose keys Redis cannot read must not keep the node down.
                    Err(e) => tracing::warn!(topic, error = %e, "cannot catch up on a topic"),
                    Ok(()) => {}
                }
            }
        }
        self.shared.set_up(true, true);
        loop {
            loop {
                match self.ctl.try_recv() {
                    Ok(Listen::Subscribe(topic, ack)) => {
                        pubsub.set_read_timeout(Some(COMMAND_TIMEOUT))?;
                        let result = pubsub.subscribe(keys(&topic).3);
                        pubsub.set_read_timeout(Some(POLL))?;
                        let failed = result.is_err();
                        let _ = ack.send(result);
                        if failed {
                            return Err(std::io::Error::other("SUBSCRIBE failed").into());
                        }
                    }
                    Ok(Listen::Unsubscribe(topic)) => {
                        pubsub.set_read_timeout(Some(COMMAND_TIMEOUT))?;
                        pubsub.unsubscribe(keys(&topic).3)?;
                        pubsub.set_read_timeout(Some(POLL))?;
                    }
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return Ok(()),
                }
            }
            match pubsub.get_message() {
                Ok(msg) => {
                    let channel = msg.get_channel_name().to_string();
                    let Ok(payload) = msg.get_payload::<String>() else {
                        tracing::warn!(channel, "ignoring a message that is not UTF-8 text");
                        continue;
                    };
                    if channel == CONTROL_CHANNEL {
                        self.shared.control(&payload);
                    } else if let Some(topic) = channel.strip_prefix("gale:") {
                        let (delivery, exclude) = split_exclusion(&payload, &self.shared.node);
                        let mut topics = self.shared.topics();
                        self.shared.forward(&mut topics, topic, delivery, exclude);
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
        }
    }
}
