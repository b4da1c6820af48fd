//! Unit tests of the spool's bookkeeping on temporary directories: order, acknowledgement,
//! rewind, the bound, recovery across reopen and torn tails.

use super::*;

fn record(n: u64) -> Record {
    Record {
        topic: format!("t/s/{}", n % 3),
        qos: 1,
        retain: n.is_multiple_of(2),
        payload: format!("{{\"seq\":{n:06},\"pad\":\"{}\"}}", "x".repeat(100)).into_bytes(),
    }
}

fn drain(spool: &mut Spool) -> Vec<(u64, Record)> {
    std::iter::from_fn(|| spool.next_unread().expect("read")).collect()
}

#[test]
fn replays_in_order_and_forgets_what_was_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("open");
    assert_eq!(recovered, Recovered::default());
    for n in 0..5 {
        assert_eq!(spool.push(&record(n)).expect("push"), 0);
    }
    let out = drain(&mut spool);
    assert_eq!(
        out.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        (0..5).map(record).collect::<Vec<_>>()
    );
    assert!(!spool.has_unread());
    spool.ack(out[1].0).expect("ack");
    assert_eq!(spool.depth(), 3);
    // A lost connection: what was not acknowledged comes again, from the oldest.
    spool.rewind();
    let again: Vec<Record> = drain(&mut spool).into_iter().map(|(_, r)| r).collect();
    assert_eq!(again, (2..5).map(record).collect::<Vec<_>>());
}

#[test]
fn a_reopened_spool_replays_what_was_not_acknowledged() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (mut spool, _) = Spool::open(dir.path(), 1 << 20).expect("open");
        for n in 0..6 {
            spool.push(&record(n)).expect("push");
        }
        let first = spool.next_unread().expect("read").expect("record");
        spool.ack(first.0).expect("ack");
        spool.sync().expect("sync");
        // Acknowledged after the last sync: replayed again after a crash (a duplicate).
        let second = spool.next_unread().expect("read").expect("record");
        spool.ack(second.0).expect("ack");
    }
    let (mut spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(recovered, Recovered { records: 5, torn: 0 });
    let again: Vec<Record> = drain(&mut spool).into_iter().map(|(_, r)| r).collect();
    assert_eq!(again, (1..6).map(record).collect::<Vec<_>>());
    // New records go after the recovered ones.
    spool.push(&record(6)).expect("push");
    spool.rewind();
    assert_eq!(drain(&mut spool).len(), 6);
}

#[test]
fn overflow_drops_the_oldest_and_deletes_empty_segments() {
    let dir = tempfile::tempdir().expect("temp dir");
    let size = record(0).encode().len() as u64;
    // Segments are at least 64 KiB, so 2000 records span several of them.
    let (mut spool, _) = Spool::open(dir.path(), size * 1000).expect("open");
    let mut dropped = 0;
    for n in 0..2000 {
        dropped += spool.push(&record(n)).expect("push");
    }
    assert_eq!(dropped, 1000);
    assert_eq!(spool.depth(), 1000);
    assert!(spool.bytes() <= size * 1000);
    let first = spool.next_unread().expect("read").expect("record").1;
    assert_eq!(first, record(1000));
    let files = fs::read_dir(dir.path()).expect("list").count() as u64;
    let on_disk: u64 = fs::read_dir(dir.path())
        .expect("list")
        .map(|entry| entry.expect("entry").metadata().expect("metadata").len())
        .sum();
    assert!(files >= 2, "segments: {files}");
    assert!(on_disk <= size * 1000 + spool.segment_bytes + 64, "{on_disk} bytes on disk");
}

#[test]
fn a_torn_tail_is_cut_off_and_the_rest_survives() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (mut spool, _) = Spool::open(dir.path(), 1 << 20).expect("open");
        for n in 0..3 {
            spool.push(&record(n)).expect("push");
        }
    }
    let segment = fs::read_dir(dir.path())
        .expect("list")
        .map(|entry| entry.expect("entry").path())
        .find(|path| path.extension().is_some_and(|ext| ext == "seg"))
        .expect("a segment");
    // A record cut short, as by a kill in the middle of a write.
    let partial = &record(3).encode()[..20];
    let mut file = OpenOptions::new().append(true).open(&segment).expect("open segment");
    file.write_all(partial).expect("append");
    drop(file);
    let (mut spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(recovered, Recovered { records: 3, torn: 1 });
    spool.push(&record(4)).expect("push");
    let out: Vec<Record> = drain(&mut spool).into_iter().map(|(_, r)| r).collect();
    assert_eq!(out, [record(0), record(1), record(2), record(4)]);
}

#[test]
fn a_flipped_byte_is_damage_not_a_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    {
        let (mut spool, _) = Spool::open(dir.path(), 1 << 20).expect("open");
        for n in 0..3 {
            spool.push(&record(n)).expect("push");
        }
    }
    let segment = dir.path().join(segment_name(1));
    let mut data = fs::read(&segment).expect("read");
    let second = record(0).encode().len() + 30;
    data[second] ^= 0xff;
    fs::write(&segment, &data).expect("write");
    let (mut spool, recovered) = Spool::open(dir.path(), 1 << 20).expect("reopen");
    assert_eq!(recovered, Recovered { records: 1, torn: 1 });
    assert_eq!(drain(&mut spool).len(), 1);
}

#[test]
fn a_second_opener_of_the_same_directory_is_refused_until_the_first_is_dropped() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (first, _) = Spool::open(dir.path(), 1 << 20).expect("open");
    let error = Spool::open(dir.path(), 1 << 20).expect_err("second open must fail");
    let text = error.to_string();
    assert!(text.contains("mqtt.spool_dir"), "{text}");
    assert!(text.contains(&dir.path().display().to_string()), "{text}");
    assert!(text.contains("another edgesight process"), "{text}");
    assert!(text.contains(&format!("pid {}", std::process::id())), "{text}");
    drop(first);
    Spool::open(dir.path(), 1 << 20).expect("open after the first was dropped");
}

#[test]
fn a_file_where_the_directory_should_be_fails_the_open_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, b"x").expect("write");
    for path in [file.clone(), file.join("spool")] {
        let text = Spool::open(&path, 1 << 20).expect_err("must fail").to_string();
        assert!(text.starts_with(&format!("mqtt.spool_dir {}: ", path.display())), "{text}");
        // The OS error appears once, not repeated by an error chain.
        assert_eq!(text.matches("os error").count(), 1, "{text}");
        let error = Spool::open(&path, 1 << 20).expect_err("must fail");
        assert!(std::error::Error::source(&error).is_none());
    }
}

#[test]
fn an_unwritable_directory_fails_the_open() {
    // Even root cannot create files in /proc/self (procfs), unlike in a mode 0555 directory.
    let path = Path::new("/proc/self");
    let text = Spool::open(path, 1 << 20).expect_err("must fail").to_string();
    assert!(text.starts_with("mqtt.spool_dir /proc/self: "), "{text}");
    assert_eq!(text.matches("os error").count(), 1, "{text}");
}

#[test]
fn io_errors_name_the_file_and_say_the_os_error_once() {
    let path = Path::new("/nonexistent/x.seg");
    let error = File::open(path).map_err(at(path)).expect_err("no such file");
    let text = error.to_string();
    assert!(text.starts_with("spool /nonexistent/x.seg: "), "{text}");
    assert_eq!(text.matches("os error 2").count(), 1, "{text}");
    assert!(std::error::Error::source(&error).is_none());
}
