//! The ublk API of a build without the `ublk` feature: nothing can create a device, so every
//! entry point fails with [`UblkFrontendError::NotBuilt`] and a device value cannot exist.

use std::convert::Infallible;
use std::sync::Arc;

use super::{UblkFrontendError, UblkOptions};
use crate::storage::Backend;

/// A running device; never constructed in a build without the `ublk` feature.
#[derive(Debug)]
pub struct UblkDevice {
    never: Infallible,
}

impl UblkDevice {
    /// The device id (N in /dev/ublkbN).
    pub fn id(&self) -> u32 {
        match self.never {}
    }

    /// The block device path.
    pub fn path(&self) -> String {
        match self.never {}
    }

    /// Stop serving and delete the device.
    pub fn stop(self) -> Result<(), UblkFrontendError> {
        match self.never {}
    }
}

/// Delete device `id`: needs the `ublk` feature.
pub fn delete(_id: u32) -> Result<(), UblkFrontendError> {
    Err(UblkFrontendError::NotBuilt)
}

/// Serve a backend as a ublk device: needs the `ublk` feature.
pub fn start(
    _backend: Arc<dyn Backend>,
    _rt: tokio::runtime::Handle,
    _opts: &UblkOptions,
) -> Result<UblkDevice, UblkFrontendError> {
    Err(UblkFrontendError::NotBuilt)
}
