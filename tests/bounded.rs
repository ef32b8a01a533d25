//! History at bounded reads (FORMAT.md §5b), through the real append and
//! read code on a local store: a long chain is read by a machine that
//! knows nothing with a few dozen requests (summaries), exactly as a full
//! listing reads it; a withheld summary costs requests, never history; a
//! withheld object in the tail is still a named gap; a machine whose
//! catalogue holds objects the store lost sees the store as it is; and
//! blobs a history names are found without reading every index.

use btrship::catalog::Catalog;
use btrship::history::{self, Select};
use btrship::state::State;
use btrship_crypto::RepoKey;
use btrship_upload::format::{BlobKind, VersionBatch, VersionEntry, VersionKind};
use btrship_upload::history::{history_name, summary_name, ChainProblem, HistoryBody, HistoryKind};
use btrship_upload::layers::{Counters, Counting};
use btrship_upload::local::LocalStore;
use btrship_upload::{Repository, Store};
use std::sync::Arc;

const SHARE: &str = "office";
const HOST: &str = "h";

struct Setup {
    _dir: tempfile::TempDir,
    rt: tokio::runtime::Runtime,
    key: Arc<RepoKey>,
    store: Arc<LocalStore>,
    state_dir: std::path::PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Arc::new(LocalStore::create(dir.path().join("repo")).unwrap());
    let state_dir = dir.path().join("state");
    std::fs::create_dir(&state_dir).unwrap();
    Setup {
        _dir: dir,
        rt,
        key: Arc::new(RepoKey::generate()),
        store,
        state_dir,
    }
}

/// The shipping machine: the repository (created) with its catalogue,
/// and its state database.
fn writer(s: &Setup) -> (Repository, State) {
    let (repo, _) =
        Repository::open_or_create(s.store.clone(), s.key.clone(), s.rt.handle().clone(), HOST)
            .unwrap();
    repo.set_cache(Arc::new(
        Catalog::open(&s.state_dir.join("catalog.db")).unwrap(),
    ));
    (repo, State::open(&s.state_dir.join("office.db")).unwrap())
}

/// Appends `n` version batches, each with one new blob (so each names
/// one index), through `history::append` as the daemon does.
fn ship_batches(state: &State, repo: &Repository, from: u64, n: u64) {
    for i in from..from + n {
        let w = repo.writer();
        w.add(BlobKind::Data, format!("content of version {i}").as_bytes())
            .unwrap();
        w.finish().unwrap();
        let batch = VersionBatch {
            share: SHARE.into(),
            host: HOST.into(),
            entries: vec![VersionEntry {
                time: format!(
                    "2026-12-03T08:{:02}:{:02}.{:09}Z",
                    i / 3600 % 60,
                    i / 60 % 60,
                    i
                ),
                path: format!("dir/file-{i}").into_bytes(),
                kind: VersionKind::Delete,
                node: None,
            }],
            chain: None,
            indexes: None,
        };
        history::append(
            repo,
            state,
            SHARE,
            HOST,
            HistoryKind::Versions,
            |link| {
                HistoryBody::Versions(VersionBatch {
                    chain: Some(link),
                    ..batch.clone()
                })
            },
            |_| false,
        )
        .unwrap();
    }
}

/// A repository as a machine that knows nothing opens it, counting its
/// requests.
fn fresh(s: &Setup) -> (Repository, Arc<Counters>) {
    let counters = Arc::new(Counters::default());
    let store: Arc<dyn Store> = Arc::new(Counting::new(s.store.clone(), counters.clone()));
    let repo = Repository::open_lazy(store, s.key.clone(), s.rt.handle().clone()).unwrap();
    (repo, counters)
}

fn read(repo: &Repository) -> history::ShareHistory {
    history::load(
        repo,
        &Select {
            share: SHARE,
            host: None,
            local_host: None,
            local_head: None,
        },
    )
    .unwrap()
}

#[test]
fn a_long_history_reads_in_a_bounded_number_of_requests() {
    let s = setup();
    let (writer, state) = writer(&s);
    // 2 level-2 summaries, 3 level-1, 7 places on their own.
    let n = 2 * 256 + 3 * 16 + 7;
    ship_batches(&state, &writer, 1, n);

    let (repo, counters) = fresh(&s);
    let hist = read(&repo);
    assert_eq!(hist.batches().unwrap().len() as u64, n);
    assert!(hist.chain.problems.is_empty(), "{:?}", hist.chain.problems);
    assert_eq!(hist.chain.head.as_ref().map(|h| h.seq), Some(n));
    let requests = counters.values().requests();
    eprintln!("fresh read of {n} places: {requests} requests");
    // Config and keys 3, chains 2, summaries 5 (+4 probes), 7 places read
    // one by one (2 names each), the end (2) and the look-ahead past it
    // (16 HEADs): 47. Listing read 1 object per place and 1 index per
    // place: 1,137.
    assert!(requests <= 60, "{requests} requests for {n} places");

    // The same history as a full listing reads it.
    let (all, bad) = repo.history_objects().unwrap();
    assert!(bad.is_empty());
    let mut listed: Vec<String> = all.iter().map(|o| o.name.clone()).collect();
    let mut walked: Vec<String> = hist
        .batches()
        .unwrap()
        .iter()
        .map(|b| b.0.clone())
        .collect();
    listed.sort();
    walked.sort();
    assert_eq!(listed, walked);

    // Every blob of the history is found through the indexes it names
    // (embedded in summaries, or read), not by listing index/.
    let (repo, counters) = fresh(&s);
    history::load_indexes(&repo, None).unwrap();
    let lists = counters.values().lists;
    // keys/ and chains/, and the garbage and forget records (FORMAT.md
    // §5c): gc/ and the chain's forgets/<chain id>/.
    assert_eq!(
        lists, 4,
        "keys/, chains/, gc/, forgets/ only: {lists} LISTs"
    );
    for i in 1..=n {
        let id = s
            .key
            .content_id(format!("content of version {i}").as_bytes());
        assert!(repo.has_blob(&id), "blob of version {i}");
    }
    let read_all = counters.values().requests();
    eprintln!("indexes of {n} places: {read_all} requests");
    assert!(read_all <= 60, "{read_all} requests");

    // A withheld level-2 summary costs requests (its 16 level-1
    // summaries are read instead), never history.
    let l2 = summary_name(&s.key, SHARE, HOST, 2, 1);
    s.rt.block_on(s.store.delete(&l2)).unwrap();
    let (repo, counters) = fresh(&s);
    let hist = read(&repo);
    assert_eq!(hist.batches().unwrap().len() as u64, n);
    assert!(hist.chain.problems.is_empty());
    let more = counters.values().requests();
    assert!(
        more > requests && more <= requests + 20,
        "{more} vs {requests}"
    );

    // A withheld object in the tail is a gap, named by its successor.
    let victim = history_name(&s.key, HistoryKind::Versions, SHARE, HOST, n - 2);
    s.rt.block_on(s.store.delete(&victim)).unwrap();
    let (repo, _) = fresh(&s);
    let hist = read(&repo);
    assert!(
        hist.chain
            .problems
            .iter()
            .any(|p| matches!(p, ChainProblem::Missing { seq, .. } if *seq == n - 2)),
        "{:?}",
        hist.chain.problems
    );

    // The writer's catalogue still holds the object; reading through it
    // sees the store as it is, not the cache.
    let cached =
        Repository::open_lazy(s.store.clone(), s.key.clone(), s.rt.handle().clone()).unwrap();
    cached.set_cache(Arc::new(
        Catalog::open(&s.state_dir.join("catalog.db")).unwrap(),
    ));
    let hist = read(&cached);
    assert!(
        hist.chain
            .problems
            .iter()
            .any(|p| matches!(p, ChainProblem::Missing { seq, .. } if *seq == n - 2)),
        "through the catalogue: {:?}",
        hist.chain.problems
    );
}

#[test]
fn a_machine_that_read_a_history_reads_only_what_is_new() {
    let s = setup();
    let (writer, state) = writer(&s);
    ship_batches(&state, &writer, 1, 300);
    let catalog = s.state_dir.join("reader-catalog.db");
    let open_cached = || {
        let (repo, counters) = fresh(&s);
        repo.set_cache(Arc::new(Catalog::open(&catalog).unwrap()));
        (repo, counters)
    };
    let (repo, counters) = open_cached();
    assert_eq!(read(&repo).batches().unwrap().len(), 300);
    let first = counters.values();
    ship_batches(&state, &writer, 301, 5);
    let (repo, counters) = open_cached();
    assert_eq!(read(&repo).batches().unwrap().len(), 305);
    let again = counters.values();
    eprintln!("first read: {first:?}; after 5 more places: {again:?}");
    // Everything it read before comes from its catalogue (checked with
    // HEADs); only the new places and probes are fetched.
    // Per new place: its two names and its index; then the end (2) and
    // config and key: 19 or so.
    assert!(again.gets <= 24, "{again:?}");
    assert!(again.gets < first.gets, "{again:?} vs {first:?}");

    // The store loses the summaries over place 20 and the place itself,
    // all in the part this reader's catalogue holds as checked: the
    // reader notices (a missing summary is checked by the ones below it,
    // down to places) and reads the chain from the store alone, so the
    // loss is a named gap.
    let victim = 20;
    for (level, first) in [(2, 1), (1, 17)] {
        s.rt.block_on(
            s.store
                .delete(&summary_name(&s.key, SHARE, HOST, level, first)),
        )
        .unwrap();
    }
    s.rt.block_on(s.store.delete(&history_name(
        &s.key,
        HistoryKind::Versions,
        SHARE,
        HOST,
        victim,
    )))
    .unwrap();
    let (repo, _) = open_cached();
    let hist = read(&repo);
    assert!(
        hist.chain
            .problems
            .iter()
            .any(|p| matches!(p, ChainProblem::Missing { seq, .. } if *seq == victim)),
        "{:?}",
        hist.chain.problems
    );
    assert_eq!(hist.batches().unwrap().len(), 304);
}

/// Figures, not a test of a bound: `BTRSHIP_BOUNDED_PLACES=20000 cargo
/// test --test bounded -- --ignored --nocapture` prints the requests and
/// seconds of reading a long history fresh and through a warm catalogue.
#[test]
#[ignore]
fn figures_for_a_long_history() {
    let n: u64 = std::env::var("BTRSHIP_BOUNDED_PLACES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5000);
    let s = setup();
    let (writer, state) = writer(&s);
    let t = std::time::Instant::now();
    ship_batches(&state, &writer, 1, n);
    eprintln!("{n} places shipped in {:.1} s", t.elapsed().as_secs_f64());
    let catalog = s.state_dir.join("reader-catalog.db");
    let repeat: usize = std::env::var("BTRSHIP_BOUNDED_REPEAT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let rounds = std::iter::once("fresh").chain(std::iter::repeat_n("warm", repeat));
    for round in rounds {
        let t = std::time::Instant::now();
        let (repo, counters) = fresh(&s);
        repo.set_cache(Arc::new(Catalog::open(&catalog).unwrap()));
        history::load_indexes(&repo, None).unwrap();
        let hist = read(&repo);
        assert_eq!(hist.batches().unwrap().len() as u64, n);
        eprintln!(
            "{round}: {n} places read in {:.3} s, {} requests",
            t.elapsed().as_secs_f64(),
            counters.values().requests()
        );
    }
}
