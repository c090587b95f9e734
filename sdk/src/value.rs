//! Values on the wire and in the store: rkyv archives tagged with their Rust type name
//! (DESIGN §4). A reader checks the tag, validates the archive once, then reads it in place:
//! [`View`] is a zero-copy view (of shared memory when the object is in the local store);
//! `get` deserializes an owned value.
//!
//! Large values are serialized straight into their store allocation: one pass counts the
//! bytes, the second writes them into the shared mapping (no intermediate buffer).

use std::marker::PhantomData;
use std::ops::Deref;

use rkyv::api::high::{HighDeserializer, HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::{Positional, Writer};
use rkyv::util::AlignedVec;
use rkyv::{Archive, Deserialize, Portable, Serialize};

/// Values above this size are sealed in the object store; smaller ones travel inline
/// (Ray's default, 100 KiB).
pub const INLINE_MAX: usize = 100 * 1024;

/// A type that can be a task argument, a return value or an object: std types, and anything
/// marked `#[sdk::value]` (which derives rkyv's `Archive`, `Serialize` and `Deserialize`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a task argument, return value or object",
    label = "not a value the cluster can carry",
    note = "mark the type `#[sdk::value]` (or derive rkyv's Archive, Serialize and Deserialize for it)"
)]
pub trait Value:
    Sized
    + Archive<
        Archived: Portable
                      + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                      + Deserialize<Self, HighDeserializer<rancor::Error>>,
    > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
    + for<'a, 'b> Serialize<HighSerializer<SliceWriter<'b>, ArenaHandle<'a>, rancor::Error>>
    + Send
    + 'static
{
}

impl<T> Value for T where
    T: Archive<
            Archived: Portable
                          + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
                          + Deserialize<T, HighDeserializer<rancor::Error>>,
        > + for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>
        + for<'a, 'b> Serialize<HighSerializer<SliceWriter<'b>, ArenaHandle<'a>, rancor::Error>>
        + Send
        + 'static
{
}

/// The type tag stored with a value (as object metadata, or next to inline bytes).
pub(crate) fn type_tag<T>() -> String {
    format!("rkyv:{}", std::any::type_name::<T>())
}

/// Writes an archive into a fixed slice, or only counts its bytes (`buf: None`).
pub struct SliceWriter<'a> {
    buf: Option<&'a mut [u8]>,
    pos: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("the archive is larger than the {0} bytes counted for it")]
struct Overflow(usize);

impl Positional for SliceWriter<'_> {
    fn pos(&self) -> usize {
        self.pos
    }
}

impl<E: rancor::Source> Writer<E> for SliceWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        let end = self.pos + bytes.len();
        if let Some(b) = &mut self.buf {
            let dst = b
                .get_mut(self.pos..end)
                .ok_or_else(|| E::new(Overflow(end)))?;
            dst.copy_from_slice(bytes);
        }
        self.pos = end;
        Ok(())
    }
}

/// The size of `v`'s archive.
pub(crate) fn archived_size<T: Value>(v: &T) -> Result<usize, String> {
    let w = rkyv::api::high::to_bytes_in::<_, rancor::Error>(v, SliceWriter { buf: None, pos: 0 })
        .map_err(|e| e.to_string())?;
    Ok(w.pos)
}

/// Archives `v` into `dst`, which must be exactly [`archived_size`] bytes and 16-aligned.
pub(crate) fn archive_into<T: Value>(v: &T, dst: &mut [u8]) -> Result<(), String> {
    let n = dst.len();
    let w = rkyv::api::high::to_bytes_in::<_, rancor::Error>(
        v,
        SliceWriter {
            buf: Some(dst),
            pos: 0,
        },
    )
    .map_err(|e| e.to_string())?;
    if w.pos != n {
        return Err(format!("archive wrote {} bytes, {} were counted", w.pos, n));
    }
    Ok(())
}

pub(crate) fn archive<T: Value>(v: &T) -> Result<AlignedVec, String> {
    rkyv::to_bytes::<rancor::Error>(v).map_err(|e| e.to_string())
}

/// Bytes of an archive, 16-aligned (rkyv's requirement): borrowed if they already are.
pub(crate) fn aligned(bytes: &[u8]) -> Aligned<'_> {
    if (bytes.as_ptr() as usize).is_multiple_of(16) {
        Aligned::Borrowed(bytes)
    } else {
        let mut v = AlignedVec::<16>::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        Aligned::Owned(v)
    }
}

pub(crate) enum Aligned<'a> {
    Borrowed(&'a [u8]),
    Owned(AlignedVec),
}

impl Deref for Aligned<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Aligned::Borrowed(b) => b,
            Aligned::Owned(v) => v,
        }
    }
}

/// Where a view's bytes live.
pub(crate) enum Source {
    /// A pinned object in this node's shared-memory store.
    Store(object_store::ObjectView),
    /// A copy in this process (inline values, objects fetched by a remote driver).
    Heap(AlignedVec),
}

impl Source {
    fn bytes(&self) -> &[u8] {
        match self {
            Source::Store(v) => v.data(),
            Source::Heap(v) => v,
        }
    }
}

/// Checks `tag` and validates the archive; the error says what was found instead.
pub(crate) fn check<T: Value>(bytes: &[u8], tag: &str) -> Result<(), String> {
    let expected = type_tag::<T>();
    if tag != expected {
        return Err(format!("holds {tag}, not {expected}"));
    }
    rkyv::access::<T::Archived, rancor::Error>(bytes)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "is not a valid archived {}: {e}",
                std::any::type_name::<T>()
            )
        })
}

pub(crate) fn decode<T: Value>(bytes: &[u8], tag: &str) -> Result<T, String> {
    let b = aligned(bytes);
    check::<T>(&b, tag)?;
    // SAFETY: validated just above.
    let archived = unsafe { rkyv::access_unchecked::<T::Archived>(&b) };
    rkyv::deserialize::<T, rancor::Error>(archived).map_err(|e| e.to_string())
}

/// A zero-copy, validated view of a value: derefs to `T::Archived`. Made from an object in
/// the local store it points into shared memory and pins the object while it lives.
pub struct View<T: Value> {
    src: Source,
    _t: PhantomData<fn() -> T>,
}

impl<T: Value> View<T> {
    pub(crate) fn new(src: Source, tag: &str) -> Result<Self, String> {
        let src = match src {
            Source::Heap(v) => Source::Heap(v),
            Source::Store(v) if (v.data().as_ptr() as usize).is_multiple_of(16) => Source::Store(v),
            Source::Store(v) => {
                let mut a = AlignedVec::with_capacity(v.data().len());
                a.extend_from_slice(v.data());
                Source::Heap(a)
            }
        };
        check::<T>(src.bytes(), tag)?;
        Ok(Self {
            src,
            _t: PhantomData,
        })
    }

    pub(crate) fn from_inline(bytes: &[u8], tag: &str) -> Result<Self, String> {
        let mut a = AlignedVec::with_capacity(bytes.len());
        a.extend_from_slice(bytes);
        Self::new(Source::Heap(a), tag)
    }

    /// True when the view points into the node's shared memory (no copy was made).
    pub fn is_shared_memory(&self) -> bool {
        matches!(self.src, Source::Store(_))
    }

    /// An owned copy of the value. Object refs in it become this process's borrows (the
    /// object viewed keeps them alive until then).
    pub fn to_owned_value(&self) -> Result<T, crate::Error> {
        let (v, fresh) =
            crate::borrow::receiving(|| rkyv::deserialize::<T, rancor::Error>(&**self));
        if !fresh.is_empty()
            && let Ok(rt) = crate::runtime::current()
        {
            rt.block_on(crate::borrow::register_self(&rt, fresh));
        }
        v.map_err(|e| crate::Error::Decode(e.to_string()))
    }
}

impl<T: Value> Deref for View<T> {
    type Target = T::Archived;
    fn deref(&self) -> &T::Archived {
        // SAFETY: `new` validated exactly these bytes; they are immutable while `src` lives
        // (a store view holds its pin).
        unsafe { rkyv::access_unchecked::<T::Archived>(self.src.bytes()) }
    }
}

impl<T: Value> std::fmt::Debug for View<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "View<{}>({} bytes)",
            std::any::type_name::<T>(),
            self.src.bytes().len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counted_size_matches_the_archive_and_slices_round_trip() {
        let v: Vec<u64> = (0..1000).collect();
        let n = archived_size(&v).unwrap();
        assert_eq!(n, archive(&v).unwrap().len());
        let mut buf = AlignedVec::<16>::with_capacity(n);
        buf.resize(n, 0);
        archive_into(&v, &mut buf).unwrap();
        assert_eq!(
            decode::<Vec<u64>>(&buf, &type_tag::<Vec<u64>>()).unwrap(),
            v
        );
        // A slice that is too small is an error, not a panic or a short archive.
        let mut small = vec![0u8; n - 1];
        assert!(archive_into(&v, &mut small).is_err());
    }

    #[test]
    fn wrong_type_and_corrupt_bytes_are_errors() {
        let b = archive(&"hello".to_string()).unwrap();
        let e = decode::<u64>(&b, &type_tag::<String>()).unwrap_err();
        assert!(e.contains("not rkyv:u64"), "{e}");
        let e = decode::<String>(&[0xff; 3], &type_tag::<String>()).unwrap_err();
        assert!(e.contains("not a valid archived"), "{e}");
        // Unaligned input is copied, not rejected.
        let mut un = vec![0u8; b.len() + 1];
        un[1..].copy_from_slice(&b);
        assert_eq!(
            decode::<String>(&un[1..], &type_tag::<String>()).unwrap(),
            "hello"
        );
    }
}
