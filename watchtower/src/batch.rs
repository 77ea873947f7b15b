//! Group commit of appointments: concurrent `add_appointment` requests share
//! one redb transaction, so one `fsync` makes a whole batch durable.
//!
//! Each appointment is a job sent to one writer thread; the writer takes
//! every job waiting (up to [`MAX_BATCH`]), stores them with
//! [`Store::add_appointments`] and answers each job only after the commit,
//! so a receipt still names a durable appointment. If the batch as a whole
//! fails (a store error), the writer stores its jobs one by one, so each
//! request gets its own error and a bad one cannot fail its neighbours.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

use crate::api::Clock;
use crate::scheme::Locator;
use crate::store::{Added, NewAppointment, Store};
use crate::{Error, Result};

/// Most appointments in one transaction.
pub const MAX_BATCH: usize = 256;
/// Jobs waiting for the writer before senders wait (backpressure).
const QUEUE: usize = 4 * MAX_BATCH;

/// Signs a receipt: locator, start block, user signature → tower signature.
pub type Signer = Arc<dyn Fn(&Locator, u64, &[u8]) -> Result<Vec<u8>> + Send + Sync>;

type Job = (NewAppointment, oneshot::Sender<Result<Added>>);

/// The handle of the writer thread. Dropping it ends the thread and waits
/// for it, so the store is closed when the tower is (a restart in the same
/// process can open the file again).
#[derive(Debug)]
pub struct Writer {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Closing the queue ends the thread after the batch at hand.
        self.jobs.take();
        if let Some(t) = self.thread.take()
            && t.join().is_err()
        {
            error!("the appointment writer panicked");
        }
    }
}

impl Writer {
    /// Starts the writer thread over `store`.
    pub fn start(store: Store, clock: Clock, sign: Signer) -> Result<Self> {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("tower-writer".into())
            .spawn(move || run(&store, &clock, &sign, rx))
            .map_err(Error::Thread)?;
        Ok(Self {
            jobs: Some(jobs),
            thread: Some(thread),
        })
    }

    /// Stores `new` durably; returns once its batch is committed.
    pub async fn add(&self, new: NewAppointment) -> Result<Added> {
        let (tx, rx) = oneshot::channel();
        let jobs = self.jobs.as_ref().ok_or(Error::WriterGone)?;
        jobs.send((new, tx)).await.map_err(|_| Error::WriterGone)?;
        rx.await.map_err(|_| Error::WriterGone)?
    }
}

fn run(store: &Store, clock: &Clock, sign: &Signer, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let (news, replies): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let now = clock();
        match store.add_appointments(news.clone(), now, |l, b, u| sign(l, b, u)) {
            Ok(results) => {
                for (reply, r) in replies.into_iter().zip(results) {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                warn!(error = %e, n = news.len(), "batch commit failed; storing one by one");
                for (reply, new) in replies.into_iter().zip(news) {
                    let r = store.add_appointment(new, now, |l, b, u| sign(l, b, u));
                    if let Err(e) = &r {
                        error!(error = %e, "storing an appointment failed");
                    }
                    let _ = reply.send(r);
                }
            }
        }
    }
}
