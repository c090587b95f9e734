//! Typed zero-copy values: a value archived with rkyv is stored as the object's data, with
//! its Rust type name as metadata, and read in place from the shared mapping. The archive is
//! validated once, when the [`Typed`] view is made; every later access is a pointer cast.

use std::marker::PhantomData;
use std::ops::Deref;
use std::time::Duration;

use protocol::ObjectId;
use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::rancor;
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use rkyv::{Archive, Portable, Serialize};

use crate::client::{ClientError, ObjectView, StoreClient};

fn type_tag<T>() -> String {
    format!("rkyv:{}", std::any::type_name::<T>())
}

impl StoreClient {
    /// Archives `value` with rkyv and stores it under `id`.
    pub fn put_typed<T>(&self, id: ObjectId, value: &T) -> Result<(), ClientError>
    where
        T: for<'a> Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
    {
        let bytes = rkyv::to_bytes::<rancor::Error>(value).map_err(|e| ClientError::Invalid {
            id,
            ty: std::any::type_name::<T>(),
            reason: e.to_string(),
        })?;
        self.put(id, &bytes, type_tag::<T>().as_bytes())
    }

    /// Gets a value stored with [`put_typed`](Self::put_typed) as a validated, zero-copy view.
    pub fn get_typed<T>(
        &self,
        id: ObjectId,
        timeout: Option<Duration>,
    ) -> Result<Typed<T>, ClientError>
    where
        T: Archive,
        T::Archived: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
    {
        Typed::new(self.get_one(id, timeout)?)
    }
}

/// A pinned view of an archived `T` in shared memory; derefs to `T::Archived`.
pub struct Typed<T: Archive> {
    view: ObjectView,
    _t: PhantomData<fn() -> T>,
}

impl<T> Typed<T>
where
    T: Archive,
    T::Archived: Portable + for<'a> CheckBytes<HighValidator<'a, rancor::Error>>,
{
    /// Checks the type tag and validates the archive (once).
    pub fn new(view: ObjectView) -> Result<Self, ClientError> {
        let expected = type_tag::<T>();
        if view.metadata() != expected.as_bytes() {
            return Err(ClientError::WrongType {
                id: view.id(),
                expected,
                found: String::from_utf8_lossy(view.metadata())
                    .chars()
                    .take(200)
                    .collect(),
            });
        }
        rkyv::access::<T::Archived, rancor::Error>(view.data()).map_err(|e| {
            ClientError::Invalid {
                id: view.id(),
                ty: std::any::type_name::<T>(),
                reason: e.to_string(),
            }
        })?;
        Ok(Self {
            view,
            _t: PhantomData,
        })
    }

    pub fn view(&self) -> &ObjectView {
        &self.view
    }
}

impl<T: Archive> Deref for Typed<T>
where
    T::Archived: Portable,
{
    type Target = T::Archived;
    fn deref(&self) -> &T::Archived {
        // SAFETY: `new` validated exactly these bytes, and they are immutable while the view
        // holds its pin.
        unsafe { rkyv::access_unchecked::<T::Archived>(self.view.data()) }
    }
}
