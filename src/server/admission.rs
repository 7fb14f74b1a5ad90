//! Admission to the in-flight limit, fair between tenants.
//!
//! A request asks for a slot once it is authenticated and its body is read, so a client that is
//! slow to send holds nothing. Slots are granted at once while any are free and the tenant holds
//! fewer than its cap; the cap (by default all but a tenth of the slots) means one tenant can never
//! take every slot. When a slot is freed it goes to the waiting tenant that holds the fewest, so a
//! tenant with a few requests is not queued behind another's many.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::oneshot;

pub struct Admission {
    capacity: usize,
    per_tenant: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    in_use: usize,
    held: HashMap<Arc<str>, usize>,
    waiting: HashMap<Arc<str>, VecDeque<oneshot::Sender<Slot>>>,
}

/// One in-flight slot; dropping it frees the slot for the next waiter.
pub struct Slot {
    admission: Option<Arc<Admission>>,
    tenant: Arc<str>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            admission.release(Arc::clone(&self.tenant));
        }
    }
}

impl State {
    fn may_take(&self, tenant: &str, capacity: usize, per_tenant: usize) -> bool {
        self.in_use < capacity && self.held.get(tenant).copied().unwrap_or(0) < per_tenant
    }

    fn take(&mut self, tenant: &Arc<str>) {
        self.in_use += 1;
        *self.held.entry(Arc::clone(tenant)).or_insert(0) += 1;
    }

    fn give_back(&mut self, tenant: &str) {
        self.in_use -= 1;
        if let Some(held) = self.held.get_mut(tenant) {
            *held -= 1;
            if *held == 0 {
                self.held.remove(tenant);
            }
        }
    }

    /// The waiter to serve next: of the tenants under their cap with someone still waiting, the
    /// one holding the fewest slots.
    fn next_waiter(&mut self, per_tenant: usize) -> Option<(Arc<str>, oneshot::Sender<Slot>)> {
        loop {
            let tenant = self
                .waiting
                .keys()
                .map(|tenant| (self.held.get(tenant).copied().unwrap_or(0), tenant))
                .filter(|(held, _)| *held < per_tenant)
                .min_by_key(|(held, _)| *held)
                .map(|(_, tenant)| Arc::clone(tenant))?;
            let queue = self.waiting.get_mut(&tenant)?;
            let waiter = queue.pop_front();
            if queue.is_empty() {
                self.waiting.remove(&tenant);
            }
            match waiter {
                // A waiter whose request was cancelled is skipped.
                Some(waiter) if !waiter.is_closed() => return Some((tenant, waiter)),
                _ => continue,
            }
        }
    }
}

impl Admission {
    pub fn new(capacity: usize, per_tenant: usize) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            per_tenant: per_tenant.clamp(1, capacity),
            state: Mutex::new(State::default()),
        })
    }

    pub async fn admit(self: &Arc<Self>, tenant: &Arc<str>) -> Slot {
        let receiver = {
            let mut state = self.state.lock();
            if state.may_take(tenant, self.capacity, self.per_tenant) {
                state.take(tenant);
                return self.slot(tenant);
            }
            let (sender, receiver) = oneshot::channel();
            state
                .waiting
                .entry(Arc::clone(tenant))
                .or_default()
                .push_back(sender);
            receiver
        };
        match receiver.await {
            Ok(slot) => slot,
            // Senders are only dropped unsent when the admission itself is dropped, which
            // cannot happen while `self` is borrowed; a fresh wait is the safe answer anyway.
            Err(_) => Box::pin(self.admit(tenant)).await,
        }
    }

    fn slot(self: &Arc<Self>, tenant: &Arc<str>) -> Slot {
        Slot {
            admission: Some(Arc::clone(self)),
            tenant: Arc::clone(tenant),
        }
    }

    fn release(self: Arc<Self>, tenant: Arc<str>) {
        let mut freed = tenant;
        loop {
            let handed = {
                let mut state = self.state.lock();
                state.give_back(&freed);
                let next = state.next_waiter(self.per_tenant);
                if let Some((tenant, _)) = &next {
                    state.take(tenant);
                }
                next
            };
            let Some((tenant, waiter)) = handed else {
                return;
            };
            match waiter.send(self.slot(&tenant)) {
                Ok(()) => return,
                // The waiter went away between the check and the send: free its slot in turn,
                // without recursing through `Drop`.
                Err(mut slot) => {
                    slot.admission = None;
                    freed = tenant;
                }
            }
        }
    }

    #[cfg(test)]
    fn in_use(&self) -> usize {
        self.state.lock().in_use
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn tenant(name: &str) -> Arc<str> {
        Arc::from(name)
    }

    #[tokio::test]
    async fn one_tenant_cannot_take_every_slot() {
        let admission = Admission::new(10, 9);
        let a = tenant("a");
        let mut held = Vec::new();
        for _ in 0..9 {
            held.push(admission.admit(&a).await);
        }
        let blocked = tokio::time::timeout(Duration::from_millis(50), admission.admit(&a)).await;
        assert!(blocked.is_err(), "a's tenth request waits");
        let b = admission.admit(&tenant("b")).await;
        assert_eq!(admission.in_use(), 10);
        drop(b);
        drop(held);
        assert_eq!(admission.in_use(), 0);
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_tenant_holding_fewest() {
        let admission = Admission::new(4, 4);
        let (a, b) = (tenant("a"), tenant("b"));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(admission.admit(&a).await);
        }
        let waiting_a = tokio::spawn({
            let (admission, a) = (Arc::clone(&admission), Arc::clone(&a));
            async move { admission.admit(&a).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let waiting_b = tokio::spawn({
            let (admission, b) = (Arc::clone(&admission), Arc::clone(&b));
            async move { admission.admit(&b).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        held.pop();
        let slot_b = tokio::time::timeout(Duration::from_secs(1), waiting_b)
            .await
            .expect("b, holding none, is served first")
            .unwrap();
        assert!(!waiting_a.is_finished(), "a, holding three, waits");
        drop(slot_b);
        let _slot_a = tokio::time::timeout(Duration::from_secs(1), waiting_a)
            .await
            .expect("then a")
            .unwrap();
    }

    #[tokio::test]
    async fn a_cancelled_waiter_does_not_leak_its_slot() {
        let admission = Admission::new(1, 1);
        let a = tenant("a");
        let first = admission.admit(&a).await;
        let cancelled = tokio::time::timeout(Duration::from_millis(20), admission.admit(&a)).await;
        assert!(cancelled.is_err());
        drop(first);
        assert_eq!(admission.in_use(), 0);
        let _again = tokio::time::timeout(Duration::from_secs(1), admission.admit(&a))
            .await
            .expect("the slot is free again");
    }
}
