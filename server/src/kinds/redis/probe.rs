//! A probe: every subscriber of a lock channel is asked for its holder
//! record (portalocker's ping); the silent ones are reaped.

use super::Inner;
use super::conn::io_error;
use super::wire::{Record, hex_id, is_holder_id};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::{Instant, timeout};

impl Inner {
    /// Asks every subscriber of `name` for its holder record. `None` when
    /// the subscriber count moved meanwhile or someone did not answer (the
    /// silent ones are reaped, so the next probe can succeed).
    pub(super) async fn collect(
        &self,
        name: &str,
        expected: u64,
    ) -> redis::RedisResult<Option<Vec<Record>>> {
        let response_channel = format!("{name}-{}", hex_id()?);
        // The connection stays open with `subscribed` until the probe ends.
        let mut subscribed = self.subscribe(None, &[&response_channel], None).await?;
        if self.numsub(name).await? != expected {
            return Ok(None);
        }
        let ping = serde_json::json!({"message": "ping", "response_channel": response_channel})
            .to_string();
        let _: u64 = redis::cmd("PUBLISH")
            .arg(name)
            .arg(ping)
            .query_async(&mut self.commands())
            .await?;
        let deadline = Instant::now() + self.config.probe_timeout;
        let mut records: HashMap<String, Record> = HashMap::new();
        let mut legacy = 0;
        while (records.len() as u64) < expected {
            let wait = deadline
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(100));
            if wait.is_zero() {
                break;
            }
            match timeout(wait, subscribed.link.messages.recv()).await {
                Ok(Some(payload)) => {
                    let record = Record::parse(&payload, legacy);
                    legacy += usize::from(record.legacy);
                    records.insert(record.holder_id.clone(), record);
                }
                Ok(None) => return Err(io_error("probe connection closed").into()),
                Err(_) => {
                    if self.numsub(name).await? != expected {
                        return Ok(None);
                    }
                }
            }
        }
        if self.numsub(name).await? != expected {
            return Ok(None);
        }
        if (records.len() as u64) < expected {
            self.reap(name, &records).await?;
            return Ok(None);
        }
        Ok(Some(records.into_values().collect()))
    }

    /// Kills the connections of holders of `name` that did not answer.
    pub(super) async fn reap(
        &self,
        name: &str,
        answered: &HashMap<String, Record>,
    ) -> redis::RedisResult<()> {
        let legacy_name = format!("{name}-lock");
        let legacy_answered = answered.values().any(|r| r.legacy);
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut self.commands())
            .await?;
        for line in list.lines() {
            let field = |key: &str| {
                line.split(' ')
                    .find_map(|kv| kv.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
                    .unwrap_or("")
            };
            let client_name = field("name");
            let silent = match client_name.strip_prefix(&legacy_name) {
                Some("") => !legacy_answered,
                Some(rest) => rest
                    .strip_prefix('-')
                    .is_some_and(|id| is_holder_id(id) && !answered.contains_key(id)),
                None => false,
            };
            if silent {
                tracing::warn!(client = %client_name, "killing an unresponsive redis lock holder");
                let _: redis::RedisResult<redis::Value> = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("ID")
                    .arg(field("id"))
                    .query_async(&mut self.commands())
                    .await;
            }
        }
        Ok(())
    }
}
