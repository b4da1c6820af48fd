//! The bounded on-disk spool: QoS ≥ 1 messages that could not be delivered wait here, in order,
//! across broker outages and daemon restarts, until the broker acknowledged them.
//!
//! Layout: a directory of segment files `<id>.seg` (id: 20 decimal digits, increasing) and a
//! `cursor` file. A segment is a run of records, each framed as `len: u32 LE`, `crc32: u32 LE`
//! (of the body), then `len` bytes of body; a body is `qos: u8`, `retain: u8`, `topic_len: u16
//! LE`, the topic, then the payload. The cursor names the segment and byte offset of the oldest
//! record not yet acknowledged; segments wholly before it are deleted. [`Spool::open`] checks
//! every record's length and checksum: a torn tail (a record cut short by a crash mid-write, or
//! one whose checksum does not match) is cut off and logged at WARN, so the spool never yields a
//! damaged message.
//!
//! Ownership: [`Spool::open`] takes an exclusive `flock` on `<dir>/lock` for the spool's life
//! (a second daemon on the same directory fails to start instead of corrupting it) and proves
//! the directory writable with a probe file, so an unusable `mqtt.spool_dir` stops the start
//! rather than losing messages at the first outage.
//!
//! Fsync policy: each record goes to the file in one `write(2)` and survives a crash of the
//! process (SIGKILL included) without any fsync. [`Spool::sync`] (called by the publisher about
//! once a second while something changed, at every segment change and at shutdown) runs
//! `fdatasync` on the tail segment and rewrites the cursor atomically (temp file, fsync,
//! rename). A power loss may therefore lose up to about a second of spooled messages and
//! replay up to a second of already acknowledged ones again (consumers dedupe by stream +
//! run_id + seq).
//!
//! Bound: the bytes of records not yet acknowledged stay at most `max_bytes`; a push beyond it
//! drops the oldest records and returns how many (the caller counts and logs them). Disk use
//! may exceed the bound by up to one segment, since a segment file is deleted only once every
//! record in it is gone.
//!
//! Bookkeeping is in memory: every record gets a number, increasing from 0 at each open, and
//! the spool keeps the oldest record's number and a *read* cursor (the next record to replay).
//! [`Spool::next_unread`] hands out records; [`Spool::ack`] drops everything up to a number
//! once the broker acknowledged it; [`Spool::rewind`] makes every unacknowledged record unread
//! again after a lost connection. No broker is needed to test any of it.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tracing::warn;

/// Bytes of the frame header: length and checksum.
const HEADER: u64 = 8;

/// Largest record body accepted; larger lengths in a file mean damage.
const MAX_RECORD: u32 = 16 * 1024 * 1024;

/// One message as spooled: where it goes and what it says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub topic: String,
    pub qos: u8,
    pub retain: bool,
    pub payload: Vec<u8>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let topic = self.topic.as_bytes();
        let topic_len = u16::try_from(topic.len()).unwrap_or(u16::MAX);
        let mut body = Vec::with_capacity(4 + topic.len() + self.payload.len());
        body.push(self.qos);
        body.push(u8::from(self.retain));
        body.extend_from_slice(&topic_len.to_le_bytes());
        body.extend_from_slice(&topic[..usize::from(topic_len)]);
        body.extend_from_slice(&self.payload);
        let mut framed = Vec::with_capacity(HEADER as usize + body.len());
        framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
        framed.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        framed.extend_from_slice(&body);
        framed
    }

    fn decode(body: &[u8]) -> Option<Record> {
        let (&qos, rest) = body.split_first()?;
        let (&retain, rest) = rest.split_first()?;
        let topic_len = usize::from(u16::from_le_bytes([*rest.first()?, *rest.get(1)?]));
        let rest = &rest[2..];
        if rest.len() < topic_len || qos > 2 || retain > 1 {
            return None;
        }
        let topic = String::from_utf8(rest[..topic_len].to_vec()).ok()?;
        Some(Record { topic, qos, retain: retain == 1, payload: rest[topic_len..].to_vec() })
    }
}

/// Where one record lives.
#[derive(Debug, Clone, Copy)]
struct Slot {
    number: u64,
    segment: u64,
    offset: u64,
    /// Framed size: header and body.
    size: u64,
}

/// What [`Spool::open`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Records waiting from a previous run.
    pub records: u64,
    /// Damaged tails cut off (one per damaged segment).
    pub torn: u64,
}

/// The spool of one publisher (one client id). See the module documentation.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    slots: VecDeque<Slot>,
    /// Live records per segment id, for deleting segments once empty.
    segments: BTreeMap<u64, u64>,
    tail: Option<(u64, File, u64)>,
    next_number: u64,
    read: u64,
    bytes: u64,
    dirty: bool,
    /// Holds the directory's lock for the spool's life; see [`lock_dir`].
    _lock: File,
}

/// A spool error names the file or directory.
///
/// The OS error is part of the message and deliberately not a `source()`: loggers and
/// reports that walk the error chain would otherwise print it twice.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Reading or writing a spool file failed.
    #[error("spool {path}: {cause}")]
    Io { path: PathBuf, cause: io::Error },
    /// The directory cannot be used at all: it cannot be created or written, or another
    /// process holds it. The daemon does not start.
    #[error("mqtt.spool_dir {dir}: {reason}")]
    Unusable { dir: PathBuf, reason: String },
}

fn at(path: &Path) -> impl FnOnce(io::Error) -> SpoolError + '_ {
    move |cause| SpoolError::Io { path: path.to_path_buf(), cause }
}

fn unusable(dir: &Path, reason: String) -> SpoolError {
    SpoolError::Unusable { dir: dir.to_path_buf(), reason }
}

/// The lock file in the spool directory; see [`lock_dir`].
const LOCK: &str = "lock";

/// The probe file [`probe_writable`] creates and removes.
const PROBE: &str = "probe.tmp";

/// Takes an exclusive advisory lock (`flock`) on `<dir>/lock`, held as long as the returned
/// file is open, so two daemons never share one spool (they would interleave records and
/// race on the cursor). The kernel releases it when the process dies, so a crash never
/// leaves a stale lock behind. The file holds the pid of the holder, for the operator.
fn lock_dir(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join(LOCK);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|error| unusable(dir, format!("cannot open the lock file {LOCK}: {error}")))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = holder.trim();
            let holder = if holder.is_empty() { "?" } else { holder };
            return Err(unusable(
                dir,
                format!(
                    "another edgesight process (pid {holder}) uses this spool directory; \
                     give each daemon its own mqtt.spool_dir or stop the other one"
                ),
            ));
        }
        Err(fs::TryLockError::Error(error)) => {
            return Err(unusable(dir, format!("cannot lock {LOCK}: {error}")));
        }
    }
    let pid = format!("{}\n", std::process::id());
    file.set_len(0)
        .and_then(|()| file.write_all_at(pid.as_bytes(), 0))
        .map_err(|error| unusable(dir, format!("cannot write the lock file {LOCK}: {error}")))?;
    Ok(file)
}

/// Proves at open that the directory takes new files (create, write, fsync, remove), so an
/// unwritable spool fails the start instead of losing messages at the first outage.
fn probe_writable(dir: &Path) -> Result<(), SpoolError> {
    let path = dir.join(PROBE);
    let probe = || -> io::Result<()> {
        let mut file = File::create(&path)?;
        file.write_all(b"edgesight spool probe\n")?;
        file.sync_all()?;
        drop(file);
        fs::remove_file(&path)
    };
    probe().map_err(|error| unusable(dir, format!("directory is not writable: {error}")))
}

impl Spool {
    /// Opens (creating it if needed) the spool in `dir`, bounded to `max_bytes` of records,
    /// and recovers what a previous run left there.
    pub fn open(dir: &Path, max_bytes: u64) -> Result<(Spool, Recovered), SpoolError> {
        fs::create_dir_all(dir)
            .map_err(|error| unusable(dir, format!("cannot create the directory: {error}")))?;
        let lock = lock_dir(dir)?;
        probe_writable(dir)?;
        let segment_bytes = (max_bytes / 16).clamp(64 * 1024, 4 * 1024 * 1024);
        let mut spool = Spool {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            slots: VecDeque::new(),
            segments: BTreeMap::new(),
            tail: None,
            next_number: 0,
            read: 0,
            bytes: 0,
            dirty: false,
            _lock: lock,
        };
        let cursor = spool.read_cursor();
        let mut recovered = Recovered::default();
        for id in spool.segment_ids()? {
            let path = spool.segment_path(id);
            let start = match cursor {
                Some((segment, _)) if id < segment => {
                    fs::remove_file(&path).map_err(at(&path))?;
                    continue;
                }
                Some((segment, offset)) if id == segment => offset,
                _ => 0,
            };
            if spool.scan(id, start)? {
                recovered.torn += 1;
            }
        }
        recovered.records = spool.slots.len() as u64;
        spool.read = spool.first_number();
        Ok((spool, recovered))
    }

    /// Reads the records of segment `id` from `start`, cutting off a damaged tail; true when
    /// one was cut.
    fn scan(&mut self, id: u64, start: u64) -> Result<bool, SpoolError> {
        let path = self.segment_path(id);
        let mut data = Vec::new();
        File::open(&path).and_then(|mut file| file.read_to_end(&mut data)).map_err(at(&path))?;
        let mut offset = start.min(data.len() as u64);
        let mut live = 0;
        while let Some(size) = valid_record(&data, offset) {
            let number = self.next_number;
            self.next_number += 1;
            self.slots.push_back(Slot { number, segment: id, offset, size });
            self.bytes += size;
            offset += size;
            live += 1;
        }
        let torn = offset < data.len() as u64;
        if torn {
            warn!(
                file = %path.display(),
                offset,
                dropped_bytes = data.len() as u64 - offset,
                "spool segment has a damaged tail (a crash mid-write); cutting it off"
            );
            let file = OpenOptions::new().write(true).open(&path).map_err(at(&path))?;
            file.set_len(offset).map_err(at(&path))?;
            file.sync_all().map_err(at(&path))?;
        }
        if live == 0 {
            fs::remove_file(&path).map_err(at(&path))?;
        } else {
            self.segments.insert(id, live);
        }
        Ok(torn)
    }

    /// Appends `record`; returns how many of the oldest records were dropped to stay within
    /// the bound (a record larger than the whole bound is kept alone).
    pub fn push(&mut self, record: &Record) -> Result<u64, SpoolError> {
        let framed = record.encode();
        let size = framed.len() as u64;
        let needs_new = match &self.tail {
            None => true,
            Some((_, _, length)) => *length > 0 && *length + size > self.segment_bytes,
        };
        if needs_new {
            self.roll()?;
        }
        let dir = self.dir.clone();
        let Some((id, file, length)) = self.tail.as_mut() else {
            return Err(SpoolError::Io { path: dir, cause: io::Error::other("no tail segment") });
        };
        let offset = *length;
        let path = dir.join(segment_name(*id));
        if let Err(source) = file.write_all(&framed) {
            // Put the length back so a half-written record does not stay in the way.
            let _ = file.set_len(offset);
            let _ = file.seek(SeekFrom::Start(offset));
            return Err(SpoolError::Io { path, cause: source });
        }
        *length += size;
        let segment = *id;
        let number = self.next_number;
        self.next_number += 1;
        self.slots.push_back(Slot { number, segment, offset, size });
        *self.segments.entry(segment).or_default() += 1;
        self.bytes += size;
        self.dirty = true;
        let mut dropped = 0;
        while self.bytes > self.max_bytes && self.slots.len() > 1 {
            self.drop_front()?;
            dropped += 1;
        }
        Ok(dropped)
    }

    /// Starts a new tail segment, syncing the one before.
    fn roll(&mut self) -> Result<(), SpoolError> {
        self.sync()?;
        let id = match (&self.tail, self.segments.keys().next_back()) {
            (Some((id, _, _)), _) => id + 1,
            (None, Some(last)) => last + 1,
            (None, None) => 1,
        };
        let path = self.segment_path(id);
        let file = OpenOptions::new().create(true).append(true).open(&path).map_err(at(&path))?;
        let length = file.metadata().map_err(at(&path))?.len();
        self.tail = Some((id, file, length));
        Ok(())
    }

    /// The next record to replay, with its number for [`Spool::ack`]; None when all are out.
    pub fn next_unread(&mut self) -> Result<Option<(u64, Record)>, SpoolError> {
        let first = self.first_number();
        let Some(slot) = self.slots.get((self.read.saturating_sub(first)) as usize).copied() else {
            return Ok(None);
        };
        // Past it even if it cannot be read, so that a damaged record is skipped, not retried.
        self.read = slot.number + 1;
        let path = self.segment_path(slot.segment);
        let mut framed = vec![0u8; slot.size as usize];
        File::open(&path)
            .and_then(|file| file.read_exact_at(&mut framed, slot.offset))
            .map_err(at(&path))?;
        let record = Record::decode(&framed[HEADER as usize..]).ok_or_else(|| SpoolError::Io {
            path: path.clone(),
            cause: io::Error::new(io::ErrorKind::InvalidData, "record body does not decode"),
        })?;
        Ok(Some((slot.number, record)))
    }

    /// True when a record waits to be replayed.
    pub fn has_unread(&self) -> bool {
        self.read < self.next_number && !self.slots.is_empty()
    }

    /// The broker acknowledged record `number`: it and every older record are done.
    pub fn ack(&mut self, number: u64) -> Result<(), SpoolError> {
        while self.slots.front().is_some_and(|slot| slot.number <= number) {
            self.drop_front()?;
        }
        Ok(())
    }

    /// After a lost connection: every record not acknowledged is unread again.
    pub fn rewind(&mut self) {
        self.read = self.first_number();
    }

    fn drop_front(&mut self) -> Result<(), SpoolError> {
        let Some(slot) = self.slots.pop_front() else { return Ok(()) };
        self.bytes -= slot.size;
        self.dirty = true;
        if self.read <= slot.number {
            self.read = slot.number + 1;
        }
        let live = self.segments.entry(slot.segment).or_default();
        *live = live.saturating_sub(1);
        let is_tail = self.tail.as_ref().is_some_and(|(id, _, _)| *id == slot.segment);
        if *live == 0 && !is_tail {
            self.segments.remove(&slot.segment);
            let path = self.segment_path(slot.segment);
            fs::remove_file(&path).map_err(at(&path))?;
        }
        Ok(())
    }

    /// Makes the spool durable: fdatasync of the tail segment and an atomic cursor rewrite.
    pub fn sync(&mut self) -> Result<(), SpoolError> {
        if !self.dirty {
            return Ok(());
        }
        if let Some((id, file, _)) = &self.tail {
            file.sync_data().map_err(at(&self.segment_path(*id)))?;
        }
        let cursor = match self.slots.front() {
            Some(slot) => format!("{} {}\n", slot.segment, slot.offset),
            None => match &self.tail {
                Some((id, _, length)) => format!("{id} {length}\n"),
                None => String::new(),
            },
        };
        let path = self.dir.join("cursor");
        let temp = self.dir.join("cursor.tmp");
        let write = || -> io::Result<()> {
            let mut file = File::create(&temp)?;
            file.write_all(cursor.as_bytes())?;
            file.sync_all()?;
            fs::rename(&temp, &path)?;
            File::open(&self.dir)?.sync_all()
        };
        write().map_err(at(&path))?;
        self.dirty = false;
        Ok(())
    }

    /// True when [`Spool::sync`] has something to write.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Records not yet acknowledged.
    pub fn depth(&self) -> u64 {
        self.slots.len() as u64
    }

    /// Their framed size in bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn first_number(&self) -> u64 {
        self.slots.front().map_or(self.next_number, |slot| slot.number)
    }

    fn segment_path(&self, id: u64) -> PathBuf {
        self.dir.join(segment_name(id))
    }

    fn segment_ids(&self) -> Result<Vec<u64>, SpoolError> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(at(&self.dir))? {
            let name = entry.map_err(at(&self.dir))?.file_name();
            let name = name.to_string_lossy();
            if let Some(id) = name.strip_suffix(".seg").and_then(|id| id.parse().ok()) {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        Ok(ids)
    }

    /// The cursor a previous run left: segment id and offset. A missing or unreadable cursor
    /// means "from the first segment".
    fn read_cursor(&self) -> Option<(u64, u64)> {
        let text = fs::read_to_string(self.dir.join("cursor")).ok()?;
        let mut words = text.split_whitespace().map(str::parse::<u64>);
        match (words.next(), words.next()) {
            (Some(Ok(segment)), Some(Ok(offset))) => Some((segment, offset)),
            _ => None,
        }
    }
}

fn segment_name(id: u64) -> String {
    format!("{id:020}.seg")
}

/// The framed size of the well-formed record at `offset`, or None (end or damage).
fn valid_record(data: &[u8], offset: u64) -> Option<u64> {
    let start = usize::try_from(offset).ok()?;
    let header = data.get(start..start + HEADER as usize)?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD {
        return None;
    }
    let body = data.get(start + HEADER as usize..start + HEADER as usize + len as usize)?;
    (crc32fast::hash(body) == crc && Record::decode(body).is_some())
        .then_some(HEADER + u64::from(len))
}

#[cfg(test)]
#[path = "spool_tests.rs"]
mod tests;
