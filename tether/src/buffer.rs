//! Read buffers whose allocations are reused.
//!
//! Bytes read from a socket are handed on as `Bytes` slices of the read buffer (no copy), so
//! a buffer cannot be reused until every slice of it has been dropped. Allocating a fresh
//! buffer for each read instead costs a page fault per 4 KiB touched, and that was a seventh
//! of the CPU time of a busy tunnel (docs/BENCHMARKS.md). A [`Recycled`] buffer keeps a few
//! older allocations aside and takes one back as soon as nothing refers to it any more.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};

/// How long after its last read bigger than the smallest a stream's pump or a tunnel's reader
/// keeps its read buffers while a read waits; then it is idle and lets go.
pub const QUIET_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// A read buffer that reuses up to `spares` older allocations.
#[derive(Debug)]
pub(crate) struct Recycled {
    buf: BytesMut,
    /// The size `buf` was allocated with; 0 for an empty placeholder that owns no allocation
    /// (new, or released), which never takes a spare's place.
    size: usize,
    /// Older allocations, with their sizes.
    spares: Vec<(BytesMut, usize)>,
    max_spares: usize,
}

impl Recycled {
    /// An empty buffer of `capacity` bytes that keeps at most `max_spares` older allocations.
    pub(crate) fn new(capacity: usize, max_spares: usize) -> Recycled {
        Recycled::from(BytesMut::with_capacity(capacity), max_spares)
    }

    /// Wraps `buf` (which may already hold bytes).
    pub(crate) fn from(buf: BytesMut, max_spares: usize) -> Recycled {
        Recycled {
            size: buf.capacity(),
            buf,
            spares: Vec::new(),
            max_spares,
        }
    }

    /// The buffer: read into its spare capacity, split off what was read.
    pub(crate) fn get(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    /// Makes room for at least `want` more bytes, keeping what the buffer holds. A new
    /// allocation, when one is needed, has at least `block` bytes; the one it replaces is
    /// kept as a spare only if it was that big too (a small one could never serve again).
    pub(crate) fn reserve(&mut self, want: usize, block: usize) {
        if self.buf.capacity() - self.buf.len() >= want || self.buf.try_reclaim(want) {
            return;
        }
        let need = want + self.buf.len();
        let reusable = self.spares.iter_mut().position(|s| s.0.try_reclaim(need));
        let (mut next, size) = match reusable {
            Some(i) => self.spares.swap_remove(i),
            None => (BytesMut::with_capacity(need.max(block)), need.max(block)),
        };
        next.extend_from_slice(&self.buf);
        let mut old = std::mem::replace(&mut self.buf, next);
        let old_size = std::mem::replace(&mut self.size, size);
        if old_size > 0 && old_size >= block && self.spares.len() < self.max_spares {
            old.clear();
            self.spares.push((old, old_size));
        }
    }

    /// Lets go of the spare allocations (an idle connection should not hold them).
    pub(crate) fn shed(&mut self) {
        self.spares.clear();
    }

    /// Lets go of every allocation if the buffer holds no bytes (an idle connection should
    /// hold none); the next [`Recycled::reserve`] allocates afresh.
    pub(crate) fn release(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
            self.size = 0;
            self.spares.clear();
        }
    }
}

/// When a tunnel's reader (and its read-ahead beneath TLS), or a stream's pump, lets go of its
/// buffers: a read that waits with no big read in the last [`QUIET_AFTER`] lets
/// go at once; one that waits sooner after a big read lets go once that time is up. A busy
/// connection keeps its buffers between reads (reused, not faulted in afresh); an idle one
/// holds none. The timer is armed once and moved only when it fires early, so a busy
/// connection pays no timer update per read.
///
/// An idle reader's `Quiet` is one null pointer: it sits in every stream's pump, and 100,000
/// idle streams should not pay for a deadline none of them uses.
#[derive(Debug, Default)]
pub(crate) struct Quiet(Option<Box<Busy>>);

/// A reader's last big read and the timer that wakes it to ask again.
#[derive(Debug)]
struct Busy {
    until: tokio::time::Instant,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Quiet {
    /// A big read: buffers stay for [`QUIET_AFTER`] more.
    pub(crate) fn busy(&mut self) {
        let until = tokio::time::Instant::now() + QUIET_AFTER;
        match &mut self.0 {
            Some(b) => b.until = until,
            None => self.0 = Some(Box::new(Busy { until, timer: None })),
        }
    }

    /// A read waits: whether to let go of the buffers now; if not, `cx` is woken when it is
    /// time to ask again.
    pub(crate) fn poll_idle(&mut self, cx: &mut std::task::Context<'_>) -> bool {
        use std::future::Future;
        let Some(busy) = self
            .0
            .as_mut()
            .filter(|b| b.until > tokio::time::Instant::now())
        else {
            self.0 = None;
            return true;
        };
        let until = busy.until;
        let timer = busy
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
        if timer.as_mut().poll(cx).is_ready() {
            // It fired at an earlier deadline: big reads came since.
            timer.as_mut().reset(until);
            let _ = timer.as_mut().poll(cx);
        }
        false
    }
}

/// A list of `Bytes` written with one vectored write (`AsyncWriteExt::write_all_buf`): what a
/// stream's receive buffer hands out without copying ([`crate::tunnel::RecvHalf::recv_chunks`]).
#[derive(Debug, Default)]
pub struct Chunks {
    chunks: VecDeque<Bytes>,
    len: usize,
}

impl Chunks {
    /// Appends `b` (an empty one is skipped).
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.len += b.len();
            self.chunks.push_back(b);
        }
    }

    /// Takes the first piece whole.
    pub fn pop(&mut self) -> Option<Bytes> {
        let b = self.chunks.pop_front()?;
        self.len -= b.len();
        Some(b)
    }
}

impl Buf for Chunks {
    fn remaining(&self) -> usize {
        self.len
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }

    fn advance(&mut self, mut cnt: usize) {
        self.len -= cnt.min(self.len);
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, c) in dst.iter_mut().zip(self.chunks.iter()) {
            *slot = IoSlice::new(c);
            n += 1;
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_allocation_is_reused_once_its_slices_are_dropped() {
        let mut r = Recycled::new(1024, 1);
        r.get().extend_from_slice(&[1; 1024]);
        let first = r.get().split().freeze();
        let first_ptr = first.as_ptr();
        // The buffer is full and its allocation is still referenced: a new one is made.
        r.reserve(1024, 1024);
        r.get().extend_from_slice(&[2; 1024]);
        let second = r.get().split().freeze();
        assert_ne!(second.as_ptr(), first_ptr);
        drop(first);
        // The first allocation is free again: it is taken back instead of a third.
        r.reserve(1024, 1024);
        assert_eq!(r.get().as_ptr(), first_ptr);
        drop(second);
    }

    #[test]
    fn bytes_held_when_growing_are_kept() {
        let mut r = Recycled::new(8, 2);
        r.get().extend_from_slice(b"abcdefgh");
        let held = r.get().split_to(6).freeze();
        r.reserve(64, 64);
        assert_eq!(&r.get()[..], b"gh");
        assert!(r.get().capacity() >= 66);
        assert_eq!(&held[..], b"abcdef");
    }

    #[test]
    fn chunks_advance_across_pieces_and_count_what_is_left() {
        let mut c = Chunks::default();
        c.push(Bytes::from_static(b"abc"));
        c.push(Bytes::new());
        c.push(Bytes::from_static(b"defg"));
        assert_eq!(c.remaining(), 7);
        let mut slices = [IoSlice::new(&[]); 4];
        assert_eq!(c.chunks_vectored(&mut slices), 2);
        c.advance(4);
        assert_eq!(c.remaining(), 3);
        assert_eq!(c.chunk(), b"efg");
        c.advance(3);
        assert_eq!(c.remaining(), 0);
        assert!(c.chunk().is_empty());
    }

    #[test]
    fn releasing_an_empty_buffer_lets_go_of_every_allocation() {
        let mut r = Recycled::new(16, 2);
        r.get().extend_from_slice(&[0; 16]);
        let held = r.get().split().freeze();
        r.reserve(16, 16);
        assert_eq!(r.spares.len(), 1);
        r.release();
        assert!(r.spares.is_empty());
        assert_eq!(r.get().capacity(), 0);
        drop(held);
    }

    #[test]
    fn a_burst_after_a_release_reuses_its_spare() {
        let mut r = Recycled::new(16, 1);
        r.get().extend_from_slice(&[0; 16]);
        drop(r.get().split());
        r.release();
        // The burst: each block is still referenced when the next is needed.
        r.reserve(16, 16);
        r.get().extend_from_slice(&[1; 16]);
        let first = r.get().split().freeze();
        r.reserve(16, 16);
        r.get().extend_from_slice(&[2; 16]);
        let second = r.get().split().freeze();
        drop(first);
        // The first block was kept as the spare (not the empty placeholder), so it can be
        // taken back now that nothing refers to it.
        assert_eq!(r.spares.len(), 1);
        assert!(
            r.spares[0].0.try_reclaim(16),
            "the spare is the first block"
        );
        drop(second);
    }

    #[test]
    fn a_small_buffer_is_not_kept_as_a_spare_for_bigger_blocks() {
        let mut r = Recycled::new(0, 2);
        // A quiet read's 4 KiB buffer, then a burst that needs 512 KiB blocks.
        r.reserve(4096, 4096);
        r.get().extend_from_slice(&[0; 4096]);
        let small = r.get().split().freeze();
        r.reserve(65536, 524_288);
        assert!(r.spares.is_empty(), "the 4 KiB buffer took a spare's slot");
        r.get().extend_from_slice(&[1; 524_288]);
        let big = r.get().split().freeze();
        r.reserve(65536, 524_288);
        assert_eq!(r.spares.len(), 1, "the block is kept");
        assert_eq!(r.spares[0].1, 524_288);
        drop((small, big));
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_reader_lets_go_at_once_when_quiet_and_a_second_after_its_last_big_read() {
        let count = std::sync::Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
        let waker = std::task::Waker::from(count.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let wakes = || count.0.load(std::sync::atomic::Ordering::SeqCst);
        let mut q = Quiet::default();
        assert!(q.poll_idle(&mut cx), "no big read: at once");
        q.busy();
        assert!(!q.poll_idle(&mut cx));
        tokio::time::advance(QUIET_AFTER / 2).await;
        // Another big read moves the deadline without touching the timer.
        q.busy();
        assert!(!q.poll_idle(&mut cx));
        tokio::time::advance(QUIET_AFTER * 3 / 4).await;
        // The timer fired at the first deadline: the reader is woken, asks, and must wait on.
        assert_eq!(wakes(), 1);
        assert!(!q.poll_idle(&mut cx));
        tokio::time::advance(QUIET_AFTER / 2).await;
        // Woken again at the second deadline, with nothing to wait for any more.
        assert_eq!(wakes(), 2);
        assert!(q.poll_idle(&mut cx));
        assert!(q.0.is_none(), "an idle reader holds no timer");
    }

    #[test]
    fn a_buffer_holding_bytes_is_not_released() {
        let mut r = Recycled::new(16, 2);
        r.get().extend_from_slice(b"abc");
        r.release();
        assert_eq!(&r.get()[..], b"abc");
    }
}
