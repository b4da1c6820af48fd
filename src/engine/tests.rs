//! Unit tests of the engine's bookkeeping: sequence numbers, smoothing per stream, heartbeats.

use super::*;
use crate::config::SmoothingMethod;
use std::time::Duration;

fn scores(label: usize) -> Vec<f32> {
    let mut scores = vec![0.1; 3];
    scores[label] = 0.8;
    scores
}

#[test]
fn numbers_each_stream_from_zero_without_gaps() {
    let mut book = StreamBook::default();
    let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
    let now = SystemTime::now();
    let seqs: Vec<u64> = [&a, &b, &a, &a, &b]
        .iter()
        .map(|stream| book.record(stream, &scores(0), now).seq)
        .collect();
    assert_eq!(seqs, [0, 0, 1, 2, 1]);
    assert_eq!(book.count("a"), 3);
    assert_eq!(book.count("c"), 0);
}

#[test]
fn reports_a_change_only_when_the_label_changes() {
    let mut book = StreamBook::default();
    let stream: Arc<str> = "door".into();
    let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(100);
    let t1 = t0 + Duration::from_secs(1);
    let t2 = t0 + Duration::from_secs(2);
    assert!(book.record(&stream, &scores(0), t0).changed);
    let same = book.record(&stream, &scores(0), t1);
    assert!(!same.changed);
    assert_eq!(same.since, t0);
    let new = book.record(&stream, &scores(2), t2);
    assert!(new.changed);
    assert_eq!((new.label, new.since), (Some(2), t2));
    let view = book.view("door");
    assert_eq!((view.label, view.raw, view.seq), (Some(2), Some((2, 0.8)), Some(2)));
}

#[test]
fn a_stream_with_its_own_smoothing_keeps_it() {
    let majority =
        SmoothingSettings { method: SmoothingMethod::Majority, window: 3, ..Default::default() };
    let overrides = HashMap::from([("steady".to_string(), majority)]);
    let mut book = StreamBook::new(SmoothingSettings::default(), overrides);
    let (steady, plain): (Arc<str>, Arc<str>) = ("steady".into(), "plain".into());
    let now = SystemTime::now();
    let labels = [0, 0, 1];
    let last = |book: &mut StreamBook, stream: &Arc<str>| {
        labels.iter().map(|&label| book.record(stream, &scores(label), now).label).last()
    };
    assert_eq!(last(&mut book, &steady), Some(Some(0)), "majority of 0, 0, 1");
    assert_eq!(last(&mut book, &plain), Some(Some(1)), "no smoothing: the latest frame");
    // The raw top-1 is the latest frame's either way.
    assert_eq!(book.view("steady").raw.map(|raw| raw.0), Some(1));
}

#[test]
fn heartbeats_come_due_for_running_streams_only() {
    let mut book = StreamBook::default();
    let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
    let t0 = Instant::now();
    let every = Duration::from_secs(60);
    book.record(&a, &scores(0), SystemTime::now());
    assert!(book.heartbeats_due(t0, every).is_empty(), "nothing sent yet, nothing to repeat");
    book.state_sent(&a, t0);
    book.state_sent(&b, t0 + Duration::from_secs(30));
    assert!(book.heartbeats_due(t0 + Duration::from_secs(59), every).is_empty());
    assert_eq!(book.heartbeats_due(t0 + Duration::from_secs(60), every), std::slice::from_ref(&a));
    let later = t0 + Duration::from_secs(95);
    assert_eq!(book.heartbeats_due(later, every), [a.clone(), b.clone()]);
    book.finish(&a);
    assert_eq!(book.heartbeats_due(later, every), [b]);
}

#[test]
fn top_k_orders_best_first_and_breaks_ties_by_label_order() {
    assert_eq!(top_k(&[0.1, 0.5, 0.2, 0.5], 3), [1, 3, 2]);
    assert_eq!(top_k(&[0.3, 0.7], 5), [1, 0]);
    assert_eq!(top_k(&[0.3, 0.7], 0), [1]);
}
