//! The libublk glue behind [`super`]: device creation, recovery and the queue threads.
//! Built only with the `ublk` feature (libublk's bindings need libclang at build time).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;

use libublk::ctrl::{UblkCtrl, UblkCtrlBuilder};
use libublk::io::{BufDescList, UblkDev, UblkIOCtx, UblkQueue};
use libublk::{BufDesc, UblkFlags, UblkIORes};

use super::{UblkFrontendError, UblkOptions, UBLK_CONTROL};
use crate::storage::{Backend, IoBuf};

fn ublk_err(what: &'static str) -> impl FnOnce(libublk::UblkError) -> UblkFrontendError {
    move |e| UblkFrontendError::Ublk {
        what,
        detail: format!("{e:?}"),
    }
}

/// What the kernel's ublk driver supports, probed (not guessed from the version).
#[derive(Debug, Clone, Copy)]
pub struct UblkFeatures {
    /// Raw UBLK_F_* bits.
    pub bits: u64,
}

impl UblkFeatures {
    /// Daemon restart keeps the device.
    pub fn user_recovery(&self) -> bool {
        self.bits & u64::from(libublk::sys::UBLK_F_USER_RECOVERY) != 0
    }
    /// In-flight requests are reissued after recovery.
    pub fn reissue(&self) -> bool {
        self.bits & u64::from(libublk::sys::UBLK_F_USER_RECOVERY_REISSUE) != 0
    }
}

/// Check that ublk is usable here and what it supports.
pub fn probe() -> Result<UblkFeatures, UblkFrontendError> {
    if !Path::new(UBLK_CONTROL).exists() {
        return Err(UblkFrontendError::NoDriver);
    }
    let bits = UblkCtrl::get_features().ok_or(UblkFrontendError::MissingFeature(
        "UBLK_U_CMD_GET_FEATURES (Linux 6.5+)",
    ))?;
    let f = UblkFeatures { bits };
    if !f.user_recovery() {
        return Err(UblkFrontendError::MissingFeature("UBLK_F_USER_RECOVERY"));
    }
    Ok(f)
}

/// One finished request, on its way back to the queue thread.
struct Done {
    tag: u16,
    result: i32,
    data: Option<IoBuf>,
}

/// User data of the eventfd poll: a target I/O with an op code no request uses.
const WAKE_OP: u32 = 0xfe;

fn errno_of(e: &crate::storage::StorageError) -> i32 {
    -e.errno()
}

/// A running device; [`UblkDevice::stop`] removes it, dropping it leaves it for recovery.
#[derive(Debug)]
pub struct UblkDevice {
    id: u32,
    thread: Option<std::thread::JoinHandle<Result<(), UblkFrontendError>>>,
}

impl UblkDevice {
    /// The device id (N in /dev/ublkbN).
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The block device path.
    pub fn path(&self) -> String {
        format!("/dev/ublkb{}", self.id)
    }

    /// Stop serving and delete the device (requests in flight finish first).
    pub fn stop(mut self) -> Result<(), UblkFrontendError> {
        let ctrl = UblkCtrl::new_simple(self.id as i32).map_err(ublk_err("opening the device"))?;
        let _ = ctrl.kill_dev();
        let r = match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| UblkFrontendError::Setup("the ublk thread panicked".into()))?,
            None => Ok(()),
        };
        let _ = ctrl.del_dev();
        r
    }
}

/// Delete device `id` whatever its state (e.g. left by a killed daemon that will not come
/// back): requests waiting on it fail with an I/O error.
pub fn delete(id: u32) -> Result<(), UblkFrontendError> {
    if !Path::new(UBLK_CONTROL).exists() {
        return Err(UblkFrontendError::NoDriver);
    }
    let ctrl = UblkCtrl::new_simple(id as i32).map_err(ublk_err("opening the device"))?;
    let _ = ctrl.kill_dev();
    ctrl.del_dev().map_err(ublk_err("deleting the device"))?;
    Ok(())
}

/// Serve `backend` as a ublk device, its I/O run on `rt`. Returns once the device is live.
pub fn start(
    backend: Arc<dyn Backend>,
    rt: tokio::runtime::Handle,
    opts: &UblkOptions,
) -> Result<UblkDevice, UblkFrontendError> {
    let features = probe()?;
    let size = backend.size();
    if size < 512 || size % 512 != 0 {
        return Err(UblkFrontendError::Setup(format!(
            "the disk size ({size} bytes) must be a non-zero multiple of 512 for a block device"
        )));
    }
    let mut ctrl_flags = u64::from(libublk::sys::UBLK_F_USER_RECOVERY);
    if features.reissue() {
        ctrl_flags |= u64::from(libublk::sys::UBLK_F_USER_RECOVERY_REISSUE);
    }
    // A device of this id left by a dead daemon: recover it instead of adding one.
    let mut recover = false;
    if let Some(id) = opts.id {
        if let Ok(old) = UblkCtrl::new_simple(id as i32) {
            let info = old.dev_info();
            let state = u32::from(info.state);
            if state == libublk::sys::UBLK_S_DEV_LIVE {
                return Err(UblkFrontendError::Setup(format!(
                    "/dev/ublkb{id} is live and served by pid {}; stop that daemon first",
                    info.ublksrv_pid
                )));
            }
            old.start_user_recover()
                .map_err(ublk_err("starting user recovery"))?;
            recover = true;
            tracing::info!(id, "recovering /dev/ublkb{id} left by a previous daemon");
        }
    }
    let (tx_id, rx_id) = mpsc::channel::<Result<u32, UblkFrontendError>>();
    let opts = opts.clone();
    let thread = std::thread::Builder::new()
        .name("ublk-ctrl".into())
        .spawn(move || {
            let r = run(backend, rt, &opts, ctrl_flags, recover, size, tx_id.clone());
            if let Err(e) = &r {
                let _ = tx_id.send(Err(UblkFrontendError::Setup(e.to_string())));
            }
            r
        })
        .map_err(|e| UblkFrontendError::Setup(format!("spawning the ublk thread: {e}")))?;
    match rx_id.recv() {
        Ok(Ok(id)) => Ok(UblkDevice {
            id,
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => match thread.join() {
            Ok(Err(e)) => Err(e),
            _ => Err(UblkFrontendError::Setup(
                "the ublk thread ended early".into(),
            )),
        },
    }
}

fn run(
    backend: Arc<dyn Backend>,
    rt: tokio::runtime::Handle,
    opts: &UblkOptions,
    ctrl_flags: u64,
    recover: bool,
    size: u64,
    tx_id: mpsc::Sender<Result<u32, UblkFrontendError>>,
) -> Result<(), UblkFrontendError> {
    let ctrl = UblkCtrlBuilder::default()
        .name("lockstep")
        .id(opts.id.map_or(-1, |i| i as i32))
        .nr_queues(opts.queues.max(1))
        .depth(opts.depth.max(1))
        .io_buf_bytes(opts.max_io_bytes)
        .ctrl_flags(ctrl_flags)
        .dev_flags(if recover {
            UblkFlags::UBLK_DEV_F_RECOVER_DEV
        } else {
            UblkFlags::UBLK_DEV_F_ADD_DEV
        })
        .build()
        .map_err(ublk_err("creating the device"))?;
    let tgt_init = move |dev: &mut UblkDev| {
        let tgt = &mut dev.tgt;
        tgt.dev_size = size;
        tgt.params = libublk::sys::ublk_params {
            types: libublk::sys::UBLK_PARAM_TYPE_BASIC | libublk::sys::UBLK_PARAM_TYPE_DISCARD,
            basic: libublk::sys::ublk_param_basic {
                attrs: libublk::sys::UBLK_ATTR_VOLATILE_CACHE | libublk::sys::UBLK_ATTR_FUA,
                logical_bs_shift: 9,
                physical_bs_shift: 12,
                io_opt_shift: 12,
                io_min_shift: 9,
                max_sectors: dev.dev_info.max_io_buf_bytes >> 9,
                dev_sectors: size >> 9,
                ..Default::default()
            },
            discard: libublk::sys::ublk_param_discard {
                discard_granularity: 4096,
                max_discard_sectors: 1 << 22,
                max_write_zeroes_sectors: 1 << 22,
                max_discard_segments: 1,
                ..Default::default()
            },
            ..Default::default()
        };
        Ok(())
    };
    let q_backend = backend.clone();
    let q_rt = rt.clone();
    let q_fn = move |qid: u16, dev: &UblkDev| {
        if let Err(e) = serve_queue(qid, dev, q_backend.clone(), q_rt.clone()) {
            tracing::error!(qid, "ublk queue stopped: {e}");
        }
    };
    let ready = move |c: &UblkCtrl| {
        let id = c.dev_info().dev_id;
        tracing::info!(id, "serving /dev/ublkb{id}");
        let _ = tx_id.send(Ok(id));
    };
    ctrl.run_target(tgt_init, q_fn, ready)
        .map_err(ublk_err("running the device"))?;
    Ok(())
}

fn serve_queue(
    qid: u16,
    dev: &UblkDev,
    backend: Arc<dyn Backend>,
    rt: tokio::runtime::Handle,
) -> Result<(), String> {
    // SAFETY: eventfd takes no pointers; the result is checked before use.
    let raw = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if raw < 0 {
        return Err(format!("eventfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a fresh descriptor we own; File closes it when the queue ends.
    let efd = unsafe { File::from_raw_fd(raw) };
    let waker = Arc::new(efd.try_clone().map_err(|e| format!("eventfd: {e}"))?);
    let (tx, rx) = mpsc::channel::<Done>();
    let bufs = std::rc::Rc::new(std::cell::RefCell::new(dev.alloc_queue_io_bufs()));
    let size = backend.size();

    let queue = UblkQueue::new(qid, dev).map_err(|e| format!("creating queue {qid}: {e:?}"))?;
    let queue = {
        let b = bufs.borrow();
        queue
            .submit_fetch_commands_unified(BufDescList::Slices(Some(&b)))
            .map_err(|e| format!("fetch commands on queue {qid}: {e:?}"))?
    };
    let arm = |q: &UblkQueue<'_>| {
        let sqe = io_uring::opcode::PollAdd::new(
            io_uring::types::Fd(efd.as_raw_fd()),
            libc::POLLIN as u32,
        )
        .build()
        .user_data(UblkIOCtx::build_user_data(0, WAKE_OP, 0, true));
        q.ublk_submit_sqe_sync(sqe)
    };
    arm(&queue).map_err(|e| format!("arming the completion eventfd: {e:?}"))?;

    let mut efd_reader = efd.try_clone().map_err(|e| format!("eventfd: {e}"))?;
    let handler = move |q: &UblkQueue<'_>, tag: u16, io: &UblkIOCtx<'_>| {
        if io.is_tgt_io() {
            if UblkIOCtx::user_data_to_op(io.user_data()) != WAKE_OP {
                return;
            }
            // Reset the counter first: a completion sent after this wakes us again.
            let mut counter = [0u8; 8];
            let _ = efd_reader.read(&mut counter);
            if let Err(e) = arm(q) {
                tracing::error!("re-arming the completion eventfd: {e:?}");
            }
            while let Ok(d) = rx.try_recv() {
                let mut b = bufs.borrow_mut();
                let buf = &mut b[d.tag as usize];
                if let Some(data) = d.data {
                    let n = data.len().min(buf.len());
                    buf.as_mut_slice()[..n].copy_from_slice(&data[..n]);
                }
                let _ = q.complete_io_cmd_unified(
                    d.tag,
                    BufDesc::Slice(buf.as_slice()),
                    Ok(UblkIORes::Result(d.result)),
                );
            }
            return;
        }
        let iod = q.get_iod(tag);
        let op = iod.op_flags & 0xff;
        let flags = iod.op_flags;
        let off = iod.start_sector << 9;
        let len = u64::from(iod.nr_sectors) << 9;
        let ranged = matches!(
            op,
            libublk::sys::UBLK_IO_OP_READ
                | libublk::sys::UBLK_IO_OP_WRITE
                | libublk::sys::UBLK_IO_OP_DISCARD
                | libublk::sys::UBLK_IO_OP_WRITE_ZEROES
        );
        let finish_now = |res: i32| {
            let b = bufs.borrow();
            let _ = q.complete_io_cmd_unified(
                tag,
                BufDesc::Slice(b[tag as usize].as_slice()),
                Ok(UblkIORes::Result(res)),
            );
        };
        if ranged && off.checked_add(len).is_none_or(|end| end > size) {
            finish_now(-libc::EINVAL);
            return;
        }
        let payload = (op == libublk::sys::UBLK_IO_OP_WRITE)
            .then(|| IoBuf::from_slice(&bufs.borrow()[tag as usize].as_slice()[..len as usize]));
        let b = backend.clone();
        let tx = tx.clone();
        let waker = waker.clone();
        let fua = flags & libublk::sys::UBLK_IO_F_FUA != 0;
        let no_unmap = flags & libublk::sys::UBLK_IO_F_NOUNMAP != 0;
        let bytes = len as i32;
        let known = matches!(
            op,
            libublk::sys::UBLK_IO_OP_READ
                | libublk::sys::UBLK_IO_OP_WRITE
                | libublk::sys::UBLK_IO_OP_FLUSH
                | libublk::sys::UBLK_IO_OP_DISCARD
                | libublk::sys::UBLK_IO_OP_WRITE_ZEROES
        );
        if !known {
            finish_now(-libc::EOPNOTSUPP);
            return;
        }
        rt.spawn(async move {
            let (result, data) = match op {
                libublk::sys::UBLK_IO_OP_READ => match b.read_at(off, len as usize).await {
                    Ok(buf) => (bytes, Some(buf)),
                    Err(e) => (errno_of(&e), None),
                },
                libublk::sys::UBLK_IO_OP_WRITE => {
                    let data = payload.expect("write payload");
                    match b.write_at(off, data, fua).await {
                        Ok(()) => (bytes, None),
                        Err(e) => (errno_of(&e), None),
                    }
                }
                libublk::sys::UBLK_IO_OP_FLUSH => match b.flush().await {
                    Ok(()) => (0, None),
                    Err(e) => (errno_of(&e), None),
                },
                libublk::sys::UBLK_IO_OP_DISCARD => match b.discard(off, len).await {
                    Ok(()) => (bytes, None),
                    Err(e) => (errno_of(&e), None),
                },
                _ => match b.write_zeroes(off, len, !no_unmap).await {
                    Ok(()) => (bytes, None),
                    Err(e) => (errno_of(&e), None),
                },
            };
            let _ = tx.send(Done { tag, result, data });
            let _ = (&*waker).write(&1u64.to_ne_bytes());
        });
    };
    queue.wait_and_handle_io(handler);
    Ok(())
}
