//! A simulated disk for the crash tests: an in-memory [`Fs`] that knows what was synced.
//!
//! Each file keeps its bytes as the process sees them and as they last reached the disk
//! (`sync_data`); each directory keeps its entries both ways (`sync_dir`). A power cut
//! ([`SimDisk::crash`]) keeps exactly what POSIX promises: a name survives only if its
//! directory was synced after the name changed, a file's bytes only up to its last sync,
//! plus, chosen by the seed, a torn piece of what was written after (a prefix of an
//! appended tail, zeros where the size reached the disk but the data did not, or part of an
//! overwrite). Faults: a power cut after the n-th change ([`SimDisk::cut_after`], every
//! later change fails with EIO), a failing n-th write or sync ([`SimDisk::fail_nth`]) and
//! a full disk ([`SimDisk::set_full`]).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Component, Path};
use std::sync::{Arc, Mutex, MutexGuard};

use super::fsio::{DirEntry, FileIo, Fs, FsRef, Open};

const EIO: i32 = 5;
const ENOENT: i32 = 2;
const EEXIST: i32 = 17;
const ENOTDIR: i32 = 20;
const EISDIR: i32 = 21;
/// The error a full disk gives.
pub(crate) const ENOSPC: i32 = 28;

/// A small deterministic generator (SplitMix64): the same seed replays the same test.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Which calls [`SimDisk::fail_nth`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// `write_all_at`.
    Write,
    /// `sync_data` and `sync_dir`.
    Sync,
}

#[derive(Debug, Clone)]
enum Node {
    File {
        data: Vec<u8>,
        durable: Vec<u8>,
    },
    Dir {
        entries: BTreeMap<String, u64>,
        durable: BTreeMap<String, u64>,
    },
}

#[derive(Debug)]
struct Disk {
    nodes: HashMap<u64, Node>,
    next_id: u64,
    /// Changes made so far (writes, syncs, creations, renames, removals).
    changes: u64,
    /// The power goes after this many changes.
    cut_at: Option<u64>,
    /// `(kind, n, errno)`: the n-th call of that kind (counted from when it was set) fails.
    fail: Option<(OpKind, u64, i32)>,
    counted: [u64; 2],
    full: bool,
}

const ROOT: u64 = 0;

/// The simulated disk; clones share it.
#[derive(Debug, Clone)]
pub(crate) struct SimDisk(Arc<Mutex<Disk>>);

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

impl SimDisk {
    /// An empty disk: just the root directory.
    pub(crate) fn new() -> SimDisk {
        let root = Node::Dir {
            entries: BTreeMap::new(),
            durable: BTreeMap::new(),
        };
        SimDisk::from_nodes(HashMap::from([(ROOT, root)]))
    }

    fn from_nodes(nodes: HashMap<u64, Node>) -> SimDisk {
        let next_id = nodes.keys().max().map_or(1, |max| max + 1);
        SimDisk(Arc::new(Mutex::new(Disk {
            nodes,
            next_id,
            changes: 0,
            cut_at: None,
            fail: None,
            counted: [0; 2],
            full: false,
        })))
    }

    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.0.lock().expect("sim disk poisoned")
    }

    /// The disk as a store's file system.
    pub(crate) fn fs(&self) -> FsRef {
        Arc::new(self.clone())
    }

    /// Changes made so far.
    pub(crate) fn changes(&self) -> u64 {
        self.disk().changes
    }

    /// Cuts the power after `n` more changes: from then on every change fails with EIO,
    /// as if the machine were gone.
    pub(crate) fn cut_after(&self, n: u64) {
        let mut disk = self.disk();
        disk.cut_at = Some(disk.changes + n);
    }

    /// Makes the `n`-th (from 1) call of `kind` from now fail with `errno`, once.
    pub(crate) fn fail_nth(&self, kind: OpKind, n: u64, errno: i32) {
        let mut disk = self.disk();
        disk.fail = Some((kind, n, errno));
        disk.counted = [0; 2];
    }

    /// A full disk refuses to create names and to grow files (with ENOSPC).
    pub(crate) fn set_full(&self, full: bool) {
        self.disk().full = full;
    }

    /// What a power cut now leaves, as a new disk; the seed picks the torn pieces.
    pub(crate) fn crash(&self, rng: &mut Rng) -> SimDisk {
        let disk = self.disk();
        let mut kept = HashMap::new();
        let mut todo = vec![ROOT];
        while let Some(id) = todo.pop() {
            let Some(node) = disk.nodes.get(&id) else {
                continue;
            };
            let survivor = match node {
                Node::Dir { durable, .. } => {
                    todo.extend(durable.values().copied());
                    Node::Dir {
                        entries: durable.clone(),
                        durable: durable.clone(),
                    }
                }
                Node::File { data, durable } => {
                    let bytes = torn(durable, data, rng);
                    Node::File {
                        data: bytes.clone(),
                        durable: bytes,
                    }
                }
            };
            kept.insert(id, survivor);
        }
        SimDisk::from_nodes(kept)
    }

    /// What a killed process (the machine still up) leaves: everything written.
    pub(crate) fn restart(&self) -> SimDisk {
        let disk = self.disk();
        let nodes = disk
            .nodes
            .iter()
            .map(|(&id, node)| (id, node.clone()))
            .collect();
        SimDisk::from_nodes(nodes)
    }
}

/// The bytes of a file after a power cut, given what was synced and what was written.
fn torn(durable: &[u8], data: &[u8], rng: &mut Rng) -> Vec<u8> {
    if data == durable {
        return data.to_vec();
    }
    let mut out = durable.to_vec();
    if data.len() > durable.len() && data.starts_with(durable) {
        // An appended tail: some prefix of it made it, maybe only as zeros (the size was
        // journaled, the data blocks were not).
        let extra = rng.below((data.len() - durable.len()) as u64 + 1) as usize;
        match rng.below(3) {
            0 => {}
            1 => out.extend_from_slice(&data[durable.len()..durable.len() + extra]),
            _ => out.resize(durable.len() + extra, 0),
        }
        return out;
    }
    // An overwrite or a truncation: the old bytes, the new, or the old with a torn run of
    // the new.
    match rng.below(3) {
        0 => out,
        1 => data.to_vec(),
        _ => {
            out.resize(data.len(), 0);
            let len = data.len().max(1) as u64;
            let from = rng.below(len) as usize;
            let to = (from + 1 + rng.below(len) as usize).min(data.len());
            out[from..to].copy_from_slice(&data[from..to]);
            out
        }
    }
}

impl Disk {
    /// Counts a change; fails once the power is cut.
    fn change(&mut self) -> io::Result<()> {
        self.changes += 1;
        if self.cut_at.is_some_and(|cut| self.changes > cut) {
            return Err(err(EIO));
        }
        Ok(())
    }

    /// Counts a call for [`SimDisk::fail_nth`].
    fn check(&mut self, kind: OpKind) -> io::Result<()> {
        self.change()?;
        let counted = &mut self.counted[kind as usize];
        *counted += 1;
        if let Some((want, n, errno)) = self.fail {
            if want == kind && *counted == n {
                self.fail = None;
                return Err(err(errno));
            }
        }
        Ok(())
    }

    fn dir_entries(&self, id: u64) -> io::Result<&BTreeMap<String, u64>> {
        match self.nodes.get(&id) {
            Some(Node::Dir { entries, .. }) => Ok(entries),
            Some(Node::File { .. }) => Err(err(ENOTDIR)),
            None => Err(err(ENOENT)),
        }
    }

    fn dir_entries_mut(&mut self, id: u64) -> io::Result<&mut BTreeMap<String, u64>> {
        match self.nodes.get_mut(&id) {
            Some(Node::Dir { entries, .. }) => Ok(entries),
            Some(Node::File { .. }) => Err(err(ENOTDIR)),
            None => Err(err(ENOENT)),
        }
    }

    /// The node at `path`.
    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let mut id = ROOT;
        for name in names(path)? {
            id = *self.dir_entries(id)?.get(name).ok_or_else(|| err(ENOENT))?;
        }
        Ok(id)
    }

    /// The directory holding `path`, and the last name.
    fn parent<'p>(&self, path: &'p Path) -> io::Result<(u64, &'p str)> {
        let names = names(path)?;
        let (last, dirs) = names.split_last().ok_or_else(|| err(EEXIST))?;
        let mut id = ROOT;
        for name in dirs {
            id = *self
                .dir_entries(id)?
                .get(*name)
                .ok_or_else(|| err(ENOENT))?;
        }
        Ok((id, last))
    }

    fn add(&mut self, dir: u64, name: &str, node: Node) -> io::Result<u64> {
        if self.full {
            return Err(err(ENOSPC));
        }
        let id = self.next_id;
        self.next_id += 1;
        self.dir_entries_mut(dir)?.insert(name.to_owned(), id);
        self.nodes.insert(id, node);
        Ok(id)
    }

    fn file(&mut self, id: u64) -> io::Result<(&mut Vec<u8>, &mut Vec<u8>)> {
        match self.nodes.get_mut(&id) {
            Some(Node::File { data, durable }) => Ok((data, durable)),
            Some(Node::Dir { .. }) => Err(err(EISDIR)),
            None => Err(err(ENOENT)),
        }
    }
}

fn names(path: &Path) -> io::Result<Vec<&str>> {
    let mut out = Vec::new();
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(name) => out.push(name.to_str().ok_or_else(|| err(ENOENT))?),
            Component::ParentDir | Component::Prefix(_) => return Err(err(ENOENT)),
        }
    }
    Ok(out)
}

fn empty_file() -> Node {
    Node::File {
        data: Vec::new(),
        durable: Vec::new(),
    }
}

impl Fs for SimDisk {
    fn open(&self, path: &Path, how: Open) -> io::Result<Arc<dyn FileIo>> {
        let mut disk = self.disk();
        let existing = disk.lookup(path);
        let id = match (existing, how) {
            (Ok(_), Open::CreateNew) => return Err(err(EEXIST)),
            (Ok(id), Open::Truncate) => {
                disk.change()?;
                disk.file(id)?.0.clear();
                id
            }
            (Ok(id), _) => {
                disk.file(id)?;
                id
            }
            (Err(e), Open::Existing) => return Err(e),
            (Err(_), _) => {
                disk.change()?;
                let (dir, name) = disk.parent(path)?;
                disk.add(dir, name, empty_file())?
            }
        };
        Ok(Arc::new(SimFile {
            disk: self.clone(),
            id,
        }))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut disk = self.disk();
        let id = disk.lookup(path)?;
        Ok(disk.file(id)?.0.clone())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        let mut id = ROOT;
        for name in names(path)? {
            id = match disk.dir_entries(id)?.get(name) {
                Some(&child) => {
                    disk.dir_entries(child)?;
                    child
                }
                None => {
                    disk.change()?;
                    let dir = Node::Dir {
                        entries: BTreeMap::new(),
                        durable: BTreeMap::new(),
                    };
                    disk.add(id, name, dir)?
                }
            };
        }
        Ok(())
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<DirEntry>> {
        let disk = self.disk();
        let id = disk.lookup(dir)?;
        let entries = disk.dir_entries(id)?;
        Ok(entries
            .iter()
            .map(|(name, child)| DirEntry {
                name: name.clone(),
                is_dir: matches!(disk.nodes.get(child), Some(Node::Dir { .. })),
            })
            .collect())
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        disk.change()?;
        let id = disk.lookup(from)?;
        let (from_dir, from_name) = disk.parent(from)?;
        let (to_dir, to_name) = disk.parent(to)?;
        disk.dir_entries_mut(from_dir)?.remove(from_name);
        disk.dir_entries_mut(to_dir)?.insert(to_name.to_owned(), id);
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        disk.change()?;
        let id = disk.lookup(path)?;
        disk.file(id)?;
        let (dir, name) = disk.parent(path)?;
        disk.dir_entries_mut(dir)?.remove(name);
        Ok(())
    }

    fn remove_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        disk.change()?;
        let id = disk.lookup(path)?;
        disk.dir_entries(id)?;
        // The children's names go with their directory's; nothing below is reachable.
        let (dir, name) = disk.parent(path)?;
        disk.dir_entries_mut(dir)?.remove(name);
        Ok(())
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let mut disk = self.disk();
        let id = disk.lookup(dir)?;
        disk.check(OpKind::Sync)?;
        match disk.nodes.get_mut(&id) {
            Some(Node::Dir { entries, durable }) => {
                *durable = entries.clone();
                Ok(())
            }
            _ => Err(err(ENOTDIR)),
        }
    }
}

/// An open file of a [`SimDisk`]; it stays usable after its name is removed.
#[derive(Debug)]
struct SimFile {
    disk: SimDisk,
    id: u64,
}

impl FileIo for SimFile {
    fn read_exact_at(&self, buf: &mut [u8], at: u64) -> io::Result<()> {
        let mut disk = self.disk.disk();
        let (data, _) = disk.file(self.id)?;
        let at = at as usize;
        let end = at.checked_add(buf.len()).filter(|&end| end <= data.len());
        let end = end.ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&data[at..end]);
        Ok(())
    }

    fn write_all_at(&self, bytes: &[u8], at: u64) -> io::Result<()> {
        let mut disk = self.disk.disk();
        disk.check(OpKind::Write)?;
        let full = disk.full;
        let (data, _) = disk.file(self.id)?;
        let end = at as usize + bytes.len();
        if end > data.len() {
            if full {
                return Err(err(ENOSPC));
            }
            data.resize(end, 0);
        }
        data[at as usize..end].copy_from_slice(bytes);
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut disk = self.disk.disk();
        disk.change()?;
        let full = disk.full;
        let (data, _) = disk.file(self.id)?;
        if len as usize > data.len() && full {
            return Err(err(ENOSPC));
        }
        data.resize(len as usize, 0);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let mut disk = self.disk.disk();
        Ok(disk.file(self.id)?.0.len() as u64)
    }

    fn sync_data(&self) -> io::Result<()> {
        let mut disk = self.disk.disk();
        disk.check(OpKind::Sync)?;
        let (data, durable) = disk.file(self.id)?;
        *durable = data.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::fsio::{sync_parent, write_durably};

    #[test]
    fn a_crash_keeps_only_what_was_synced() {
        let disk = SimDisk::new();
        let fs = disk.fs();
        fs.create_dir_all(Path::new("/s/a")).unwrap();
        sync_parent(&*fs, Path::new("/s")).unwrap();
        sync_parent(&*fs, Path::new("/s/a")).unwrap();
        let kept = fs.open(Path::new("/s/a/kept"), Open::CreateNew).unwrap();
        kept.write_all_at(b"synced", 0).unwrap();
        kept.sync_data().unwrap();
        sync_parent(&*fs, Path::new("/s/a/kept")).unwrap();
        kept.write_all_at(b" and not", 6).unwrap();
        write_durably(&*fs, Path::new("/s/a/replaced"), b"old").unwrap();
        write_durably(&*fs, Path::new("/s/a/replaced"), b"new").unwrap();
        let lost = fs.open(Path::new("/s/a/lost"), Open::CreateNew).unwrap();
        lost.write_all_at(b"data synced, name not", 0).unwrap();
        lost.sync_data().unwrap();

        for seed in 0..50 {
            let after = disk.crash(&mut Rng::new(seed)).fs();
            let names: Vec<_> = after
                .list(Path::new("/s/a"))
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
            assert_eq!(names, ["kept", "replaced"], "seed {seed}");
            let bytes = after.read(Path::new("/s/a/kept")).unwrap();
            assert!(
                bytes.starts_with(b"synced") && bytes.len() <= 14,
                "seed {seed}"
            );
            assert_eq!(after.read(Path::new("/s/a/replaced")).unwrap(), b"new");
        }
        // A killed process loses nothing.
        let after = disk.restart().fs();
        assert_eq!(
            after.read(Path::new("/s/a/kept")).unwrap(),
            b"synced and not"
        );
    }

    #[test]
    fn faults_fail_the_calls_they_name() {
        let disk = SimDisk::new();
        let fs = disk.fs();
        let file = fs.open(Path::new("/f"), Open::CreateNew).unwrap();
        disk.fail_nth(OpKind::Sync, 2, EIO);
        file.sync_data().unwrap();
        assert_eq!(file.sync_data().unwrap_err().raw_os_error(), Some(EIO));
        file.sync_data().unwrap();
        disk.set_full(true);
        let e = file.write_all_at(b"x", 0).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        disk.set_full(false);
        disk.cut_after(1);
        file.write_all_at(b"x", 0).unwrap();
        assert!(file.write_all_at(b"y", 1).is_err(), "the power is gone");
    }
}
