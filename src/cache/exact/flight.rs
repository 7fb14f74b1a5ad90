//! Single-flight for cache misses: concurrent identical requests share one upstream call.
//!
//! The first miss for a key becomes the leader; later ones follow and wait for its answer. The
//! leader publishes only an answer that may be cached; a failure, a truncated stream or an
//! uncacheable answer publishes nothing and each follower then asks upstream itself. After
//! publishing, the flight stays open until the cache write landed ([`Landing`]), so a request
//! arriving in between gets the published answer instead of a second upstream call.

use std::collections::HashMap;
use std::sync::Arc;

use crate::protocol::answer::Answer;
use parking_lot::Mutex;
use tokio::sync::watch;

#[derive(Debug, Clone)]
enum State {
    Running,
    Done(Option<Answer>),
}

#[derive(Default)]
pub struct Flights {
    running: Mutex<HashMap<String, watch::Receiver<State>>>,
}

pub enum Joined {
    Leader(Leader),
    Follower(Follower),
}

impl Flights {
    pub fn join(self: &Arc<Self>, key: &str) -> Joined {
        let mut running = self.running.lock();
        if let Some(receiver) = running.get(key) {
            return Joined::Follower(Follower {
                receiver: receiver.clone(),
            });
        }
        let (sender, receiver) = watch::channel(State::Running);
        running.insert(key.to_owned(), receiver);
        Joined::Leader(Leader {
            flight: Some(Flight {
                flights: Arc::clone(self),
                key: key.to_owned(),
                sender,
            }),
        })
    }
}

struct Flight {
    flights: Arc<Flights>,
    key: String,
    sender: watch::Sender<State>,
}

impl Flight {
    fn close(self, answer: Option<Answer>) {
        self.sender.send_replace(State::Done(answer));
        let mut running = self.flights.running.lock();
        if running
            .get(&self.key)
            .is_some_and(|r| r.same_channel(&self.sender.subscribe()))
        {
            running.remove(&self.key);
        }
    }
}

/// The request that calls upstream. Dropped without publishing (failure, cancellation), it tells
/// the followers to go upstream themselves.
pub struct Leader {
    flight: Option<Flight>,
}

impl Leader {
    /// Hands `answer` to the followers at once; the flight closes when the returned [`Landing`]
    /// is dropped (after the cache write).
    pub fn publish(mut self, answer: Answer) -> Landing {
        let flight = self.flight.take();
        if let Some(flight) = &flight {
            flight
                .sender
                .send_replace(State::Done(Some(answer.clone())));
        }
        Landing { flight, answer }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if let Some(flight) = self.flight.take() {
            flight.close(None);
        }
    }
}

/// Keeps a published flight open until the cache write is done.
pub struct Landing {
    flight: Option<Flight>,
    answer: Answer,
}

impl Drop for Landing {
    fn drop(&mut self) {
        if let Some(flight) = self.flight.take() {
            flight.close(Some(self.answer.clone()));
        }
    }
}

pub struct Follower {
    receiver: watch::Receiver<State>,
}

impl Follower {
    /// The leader's answer, or `None` if it had none to share.
    pub async fn answer(mut self) -> Option<Answer> {
        loop {
            if let State::Done(answer) = &*self.receiver.borrow_and_update() {
                return answer.clone();
            }
            if self.receiver.changed().await.is_err() {
                return match &*self.receiver.borrow() {
                    State::Done(answer) => answer.clone(),
                    State::Running => None,
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn followers_get_the_leaders_answer_and_the_flight_closes_after_landing() {
        let flights = Arc::new(Flights::default());
        let Joined::Leader(leader) = flights.join("k") else {
            panic!("first is leader")
        };
        let Joined::Follower(follower) = flights.join("k") else {
            panic!("second follows")
        };
        let waiting = tokio::spawn(follower.answer());
        let landing = leader.publish(Answer::from_value(json!({"a": 1})));
        let answered = |answer: Option<Answer>| answer.map(|a| a.value().clone());
        assert_eq!(answered(waiting.await.unwrap()), Some(json!({"a": 1})));
        let Joined::Follower(late) = flights.join("k") else {
            panic!("still open until the write lands")
        };
        assert_eq!(answered(late.answer().await), Some(json!({"a": 1})));
        drop(landing);
        assert!(matches!(flights.join("k"), Joined::Leader(_)));
    }

    #[tokio::test]
    async fn a_failed_leader_shares_nothing() {
        let flights = Arc::new(Flights::default());
        let Joined::Leader(leader) = flights.join("k") else {
            panic!()
        };
        let Joined::Follower(follower) = flights.join("k") else {
            panic!()
        };
        drop(leader);
        assert!(follower.answer().await.is_none());
        assert!(matches!(flights.join("k"), Joined::Leader(_)));
    }
}
