//! Fair admission between services: one FIFO lane per service, served by stride scheduling.
//!
//! Each lane has a *pass*; the scheduler admits the front request of the non-empty lane with
//! the smallest pass and advances that lane's pass by `STRIDE / priority`. A service with
//! priority 2 therefore gets two admissions for every one of a priority-1 service while both
//! have requests waiting, and a quiet service's first request goes ahead of a busy service's
//! backlog: a lane that was empty rejoins at the current virtual time (the pass of the last
//! admission), so it has no saved-up credit either. Ties go to the request that arrived first,
//! so with a single service this is plain FCFS.

use std::collections::VecDeque;
use std::sync::Arc;

const STRIDE: u64 = 1 << 20;

struct Lane<T> {
    name: Arc<str>,
    priority: u32,
    pass: u64,
    /// (arrival number, item)
    items: VecDeque<(u64, T)>,
}

/// Per-service FIFO lanes with weighted round-robin popping.
pub struct FairQueue<T> {
    lanes: Vec<Lane<T>>,
    vtime: u64,
    arrivals: u64,
}

impl<T> Default for FairQueue<T> {
    fn default() -> Self {
        FairQueue {
            lanes: Vec::new(),
            vtime: 0,
            arrivals: 0,
        }
    }
}

impl<T> FairQueue<T> {
    pub fn push(&mut self, service: &Arc<str>, priority: u32, item: T) {
        let i = match self.lanes.iter().position(|l| l.name == *service) {
            Some(i) => i,
            None => {
                self.lanes.push(Lane {
                    name: service.clone(),
                    priority,
                    pass: 0,
                    items: VecDeque::new(),
                });
                self.lanes.len() - 1
            }
        };
        let l = &mut self.lanes[i];
        if l.items.is_empty() {
            l.pass = l.pass.max(self.vtime);
        }
        l.priority = priority.max(1);
        l.items.push_back((self.arrivals, item));
        self.arrivals += 1;
    }

    /// The lane whose front is admitted next: by pass among the lanes of `preferred` services
    /// when any of them has a request waiting, else among all.
    fn pick(&self, preferred: &[Arc<str>]) -> Option<usize> {
        let best = |only_preferred: bool| {
            self.lanes
                .iter()
                .enumerate()
                .filter(|(_, l)| !only_preferred || preferred.contains(&l.name))
                .filter_map(|(i, l)| l.items.front().map(|(n, _)| (l.pass, *n, i)))
                .min()
                .map(|(_, _, i)| i)
        };
        best(true).or_else(|| best(false))
    }

    /// The request admitted next.
    pub fn front(&self) -> Option<&T> {
        self.front_preferring(&[])
    }

    /// The request admitted next when `preferred` services go first (services owed batch
    /// slots).
    pub fn front_preferring(&self, preferred: &[Arc<str>]) -> Option<&T> {
        self.pick(preferred)
            .and_then(|i| self.lanes[i].items.front().map(|(_, t)| t))
    }

    pub fn pop_front(&mut self) -> Option<T> {
        self.pop_front_preferring(&[])
    }

    pub fn pop_front_preferring(&mut self, preferred: &[Arc<str>]) -> Option<T> {
        let i = self.pick(preferred)?;
        let l = &mut self.lanes[i];
        self.vtime = self.vtime.max(l.pass);
        l.pass += STRIDE / l.priority as u64;
        l.items.pop_front().map(|(_, t)| t)
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        for l in &mut self.lanes {
            l.items.retain(|(_, t)| keep(t));
        }
    }

    /// The services with requests waiting, with their priorities.
    pub fn waiting(&self) -> impl Iterator<Item = (&Arc<str>, u32)> {
        self.lanes
            .iter()
            .filter(|l| !l.items.is_empty())
            .map(|l| (&l.name, l.priority))
    }

    pub fn len(&self) -> usize {
        self.lanes.iter().map(|l| l.items.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.lanes.iter().all(|l| l.items.is_empty())
    }

    /// Remove everything, in arrival order.
    pub fn drain(&mut self) -> Vec<T> {
        let mut all: Vec<(u64, T)> = self
            .lanes
            .iter_mut()
            .flat_map(|l| l.items.drain(..))
            .collect();
        all.sort_by_key(|(n, _)| *n);
        all.into_iter().map(|(_, t)| t).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weighted_round_robin() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let mut q = FairQueue::default();
        for i in 0..6 {
            q.push(&a, 1, format!("a{i}"));
        }
        assert_eq!(q.pop_front().unwrap(), "a0");
        q.push(&b, 1, "b0".to_string());
        q.push(&b, 1, "b1".to_string());
        let order: Vec<String> = std::iter::from_fn(|| q.pop_front()).collect();
        assert_eq!(order, ["b0", "a1", "b1", "a2", "a3", "a4", "a5"]);
        // Priority 2 gets two of every three admissions.
        for i in 0..6 {
            q.push(&a, 1, format!("a{i}"));
            q.push(&b, 2, format!("b{i}"));
        }
        let first6: Vec<String> = (0..6).map(|_| q.pop_front().unwrap()).collect();
        assert_eq!(
            first6.iter().filter(|s| s.starts_with('b')).count(),
            4,
            "{first6:?}"
        );
    }
}
