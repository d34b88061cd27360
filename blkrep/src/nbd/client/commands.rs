//! The commands of the transmission phase, one method each: `read`, `write`, `flush`,
//! `trim`, `write_zeroes`, `block_status`, `disconnect`, which wait for their reply, and
//! the `submit_*` calls, which only put a request on its way ([`Ticket`]).
//!
//! FUA is honoured the same way on every command that takes it: with the flag when the
//! server advertised `NBD_FLAG_SEND_FUA`, else by a flush after the command. (The `submit_*`
//! calls cannot wait for the command before the flush: they refuse FUA instead.)

use tokio::io::AsyncWriteExt;

use super::transmission::Ticket;
use super::NbdClient;
use crate::nbd::codec::Request;
use crate::nbd::proto::*;
use crate::nbd::NbdError;
use crate::storage::IoBuf;

impl NbdClient {
    /// Submit a write without waiting for its reply (see [`Ticket`]). Like every `submit_*`
    /// call it only buffers the request: [`NbdClient::send_submitted`] puts the batch on the
    /// wire, and a ticket waited on before that waits forever.
    pub async fn submit_write(
        &self,
        offset: u64,
        data: &[u8],
        fua: bool,
    ) -> Result<Ticket, NbdError> {
        self.check(offset, data.len() as u64)?;
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Invalid("write larger than 4 GiB".into()))?;
        let flags = if fua { self.fua_flag()? } else { 0 };
        self.submit(
            Self::req(CMD_WRITE, flags, offset, len),
            Some(data),
            None,
            false,
        )
        .await
    }

    /// Submit a trim without waiting for its reply.
    pub async fn submit_trim(&self, offset: u64, len: u32, fua: bool) -> Result<Ticket, NbdError> {
        self.check(offset, u64::from(len))?;
        self.need(FLAG_SEND_TRIM, "trim")?;
        let flags = if fua { self.fua_flag()? } else { 0 };
        self.submit(Self::req(CMD_TRIM, flags, offset, len), None, None, false)
            .await
    }

    /// Submit a write-zeroes without waiting for its reply.
    pub async fn submit_write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_unmap: bool,
        fua: bool,
    ) -> Result<Ticket, NbdError> {
        self.check(offset, u64::from(len))?;
        self.need(FLAG_SEND_WRITE_ZEROES, "write-zeroes")?;
        let mut flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
        if fua {
            flags |= self.fua_flag()?;
        }
        self.submit(
            Self::req(CMD_WRITE_ZEROES, flags, offset, len),
            None,
            None,
            false,
        )
        .await
    }

    /// Submit a flush without waiting for its reply.
    pub async fn submit_flush(&self) -> Result<Ticket, NbdError> {
        self.need(FLAG_SEND_FLUSH, "flush")?;
        self.submit(Self::req(CMD_FLUSH, 0, 0, 0), None, None, false)
            .await
    }

    /// Push requests submitted with the `submit_*` calls onto the wire. Those calls only
    /// buffer (so that a batch of requests costs one system call): call this after a batch.
    pub async fn send_submitted(&self) -> Result<(), NbdError> {
        let mut w = self.shared.writer.lock().await;
        w.flush().await.map_err(|e| NbdError::Io {
            context: format!("sending requests to {}", self.shared.peer),
            source: e,
        })
    }

    fn fua_flag(&self) -> Result<u16, NbdError> {
        self.need(FLAG_SEND_FUA, "FUA").map(|()| CMD_FLAG_FUA)
    }

    /// Read `len` bytes (at most the server's maximum payload) at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<IoBuf, NbdError> {
        self.check(offset, u64::from(len))?;
        let p = self
            .request(
                Self::req(CMD_READ, 0, offset, len),
                None,
                Some(IoBuf::zeroed(len as usize)),
            )
            .await?;
        Ok(p.data.expect("read keeps its buffer"))
    }

    /// Write `data` at `offset`; with `fua`, durable on the server when this returns.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), NbdError> {
        self.check(offset, data.len() as u64)?;
        let len = u32::try_from(data.len())
            .map_err(|_| NbdError::Invalid("write larger than 4 GiB".into()))?;
        self.durable(Self::req(CMD_WRITE, 0, offset, len), Some(data), fua)
            .await
    }

    /// Run a write, trim or write-zeroes; with `fua`, durable on the server when this
    /// returns: by `NBD_CMD_FLAG_FUA` where the server takes it (`NBD_FLAG_SEND_FUA`), else
    /// by a flush once the command has completed.
    async fn durable(
        &self,
        mut req: Request,
        payload: Option<&[u8]>,
        fua: bool,
    ) -> Result<(), NbdError> {
        let emulate = fua && !self.can_fua();
        if fua && !emulate {
            req.flags |= CMD_FLAG_FUA;
        }
        self.request(req, payload, None).await?;
        if emulate {
            self.flush().await?;
        }
        Ok(())
    }

    /// Ask the server to make every completed write durable.
    pub async fn flush(&self) -> Result<(), NbdError> {
        if !self.has(FLAG_SEND_FLUSH) {
            return Ok(());
        }
        self.request(Self::req(CMD_FLUSH, 0, 0, 0), None, None)
            .await
            .map(drop)
    }

    /// Discard a range; with `fua`, durable on the server when this returns.
    pub async fn trim(&self, offset: u64, len: u32, fua: bool) -> Result<(), NbdError> {
        self.check(offset, u64::from(len))?;
        self.need(FLAG_SEND_TRIM, "trim")?;
        self.durable(Self::req(CMD_TRIM, 0, offset, len), None, fua)
            .await
    }

    /// Zero a range; with `may_unmap`, the server may deallocate it; with `fua`, durable on
    /// the server when this returns.
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        may_unmap: bool,
        fua: bool,
    ) -> Result<(), NbdError> {
        self.check(offset, u64::from(len))?;
        self.need(FLAG_SEND_WRITE_ZEROES, "write-zeroes")?;
        let flags = if may_unmap { 0 } else { CMD_FLAG_NO_HOLE };
        self.durable(Self::req(CMD_WRITE_ZEROES, flags, offset, len), None, fua)
            .await
    }

    /// base:allocation extents from `offset`: (length, NBD_STATE_* flags).
    pub async fn block_status(&self, offset: u64, len: u32) -> Result<Vec<(u32, u32)>, NbdError> {
        self.check(offset, u64::from(len))?;
        if self.info.base_allocation.is_none() {
            return Err(NbdError::Invalid(
                "base:allocation was not negotiated".into(),
            ));
        }
        let p = self
            .request(Self::req(CMD_BLOCK_STATUS, 0, offset, len), None, None)
            .await?;
        Ok(p.status)
    }

    /// Send NBD_CMD_DISC once every earlier request has been answered, and close.
    pub async fn disconnect(&self) -> Result<(), NbdError> {
        let mut hdr = Vec::new();
        Self::req(CMD_DISC, 0, 0, 0).encode(&mut hdr);
        let mut w = self.shared.writer.lock().await;
        w.write_all(&hdr)
            .await
            .map_err(NbdError::io("sending disconnect"))?;
        w.flush()
            .await
            .map_err(NbdError::io("sending disconnect"))?;
        let _ = w.shutdown().await;
        Ok(())
    }
}
