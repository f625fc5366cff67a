"""Image sources for pre-training: a TFDS dataset, a folder of images, or the demo photos.

Every source is random access: image ``i`` (0 <= i < num_images) can be loaded on its
own, so the epoch order, the shape buckets and the host shards are planned on the
host from a small per-image *index* (height, width, status, decoder), and each host
reads only its own rows.

The index comes from one probing pass over the encoded bytes with PIL (header, then a
full decode, at 1/8 scale for JPEG via ``draft``, which still reads the whole entropy
stream and so catches truncation). Its status is one of STATUS_NAMES:
  ok; skipped: corrupt (undecodable), truncated, too_small (a side <= 16 px);
  converted to RGB: grayscale (modes 1/L/LA/I/F), cmyk, alpha (RGBA/PA/P with
  transparency; the alpha channel is dropped).
With ``index_cache_dir`` set the index is saved once and reused (keyed by the
file list / dataset identity). ``decoder`` picks how the image is decoded in the
pipeline: TensorFlow (JPEG L/RGB with the accurate integer IDCT, as PIL; PNG 8-bit
modes) or PIL inside ``tf.numpy_function`` (CMYK JPEG, GIF, BMP, 16-bit and other
rare modes).

Sources:
  folder: every *.jpg/.jpeg/.png/.bmp/.gif (any case) under ``folder``, recursively,
    sorted by relative POSIX path; read with ``tf.io.read_file`` (gs:// works).
  tfds:   ``tfds_name`` / ``tfds_split`` (labels ignored). Random access through
    ``as_data_source`` when the dataset was prepared as ArrayRecord, otherwise
    through an offset index over its TFRecord shards.
  demo:   photographs shipped inside scikit-image (no network), decoded in memory
    (long side shrunk to at most DEMO_MAX_SIDE=640 once).
  mosaics: the learnability benchmark's random mosaics (data/mosaics.py), rendered
    in memory.
  memory: any list of uint8 arrays (``MemorySource``; used by demo and
    ``cache_decoded``).

One file: the three sources share the per-image index, its probing pass and its
bad-file statuses; each source is a few small classes over them.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import io
import os
import struct
import threading

import numpy as np
import tensorflow as tf
from PIL import Image

from updetr_jax import files

OK, CORRUPT, TRUNCATED, TOO_SMALL, GRAYSCALE, CMYK, ALPHA = range(7)
STATUS_NAMES = ('ok', 'corrupt', 'truncated', 'too_small', 'grayscale', 'cmyk', 'alpha')
SKIP_STATUSES = (CORRUPT, TRUNCATED, TOO_SMALL)
DECODER_TF, DECODER_PIL, DECODER_TF_JPEG = 0, 1, 2
MIN_SIDE = 16  # images with a side <= 16 px are skipped, as in the release
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
_GRAY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')
_ALPHA_MODES = ('RGBA', 'RGBa', 'PA')
_TF_MODES = {'JPEG': ('L', 'RGB'), 'PNG': ('1', 'L', 'LA', 'P', 'RGB', 'RGBA')}
_INDEX_VERSION = 1

# Demo photographs (skimage.data functions that load offline from the wheel; the
# last four are grayscale and are converted to RGB).
DEMO_IMAGES = (
  'astronaut',
  'chelsea',
  'coffee',
  'rocket',
  'hubble_deep_field',
  'immunohistochemistry',
  'retina',
  'colorwheel',
  'camera',
  'coins',
  'clock',
  'moon',
)
# The pre-training demo trains on DEMO_TRAIN_IMAGES and evaluates on photos it never
# sees (DEMO_EVAL_IMAGES, also offline in the wheel).
DEMO_EVAL_IMAGES = ('coffee', 'camera', 'cell', 'gravel')
DEMO_TRAIN_IMAGES = tuple(n for n in DEMO_IMAGES if n not in DEMO_EVAL_IMAGES)


class ImageIndex:
  """Per-image metadata: height, width int32 [n], status int8 [n], decoder int8 [n]."""

  def __init__(self, height, width, status, decoder):
    self.height = np.asarray(height, np.int32)
    self.width = np.asarray(width, np.int32)
    self.status = np.asarray(status, np.int8)
    self.decoder = np.asarray(decoder, np.int8)

  def __len__(self):
    return len(self.status)

  @property
  def usable(self):
    """bool [n]: not skipped."""
    return ~np.isin(self.status, SKIP_STATUSES)

  @classmethod
  def load(cls, path):
    z = files.read_npz(path)
    return cls(z['height'], z['width'], z['status'], z['decoder'])


def _looks_truncated(err: Exception) -> bool:
  return isinstance(err, EOFError) or 'truncat' in str(err).lower()


def probe_image(data: bytes):
  """Classify encoded image bytes -> (height, width, status, decoder)."""
  try:
    im = Image.open(io.BytesIO(data))
    w, h = im.size
    fmt, mode = im.format, im.mode
  except Exception:  # noqa: BLE001  (anything PIL cannot identify is corrupt)
    return 0, 0, CORRUPT, DECODER_PIL
  if min(w, h) <= MIN_SIDE:
    return h, w, TOO_SMALL, DECODER_PIL
  try:
    if fmt == 'JPEG':
      im.draft(mode, (max(1, w // 8), max(1, h // 8)))
    im.load()
  except Exception as e:  # noqa: BLE001
    return h, w, (TRUNCATED if _looks_truncated(e) else CORRUPT), DECODER_PIL
  if mode == 'CMYK':
    status = CMYK
  elif mode in _GRAY_MODES:
    status = GRAYSCALE
  elif mode in _ALPHA_MODES or (mode == 'P' and 'transparency' in im.info):
    status = ALPHA
  else:
    status = OK
  if mode not in _TF_MODES.get(fmt, ()):
    decoder = DECODER_PIL
  else:
    decoder = DECODER_TF_JPEG if fmt == 'JPEG' else DECODER_TF
  return h, w, status, decoder


def pil_decode(data: bytes) -> np.ndarray:
  """Encoded bytes -> uint8 RGB [h, w, 3] with PIL (first frame, alpha dropped)."""
  im = Image.open(io.BytesIO(data))
  if im.mode in ('I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F'):
    a = np.asarray(im, np.float64)
    a = np.clip(a * (255.0 / max(a.max(), 1.0)), 0, 255).astype(np.uint8)
    return np.repeat(a[..., None], 3, -1)
  return np.asarray(im.convert('RGB'))


def to_rgb_array(a: np.ndarray):
  """Any 2-D/3-D image array -> (uint8 [h, w, 3], status)."""
  a = np.asarray(a)
  status = OK
  if a.dtype != np.uint8:
    a = np.asarray(a, np.float64)
    a = a * 255.0 if a.max() <= 1.0 else a
    a = np.clip(np.round(a), 0, 255).astype(np.uint8)
  if a.ndim == 2:
    a, status = np.repeat(a[..., None], 3, -1), GRAYSCALE
  elif a.shape[-1] == 4:
    a, status = a[..., :3], ALPHA
  elif a.shape[-1] == 1:
    a, status = np.repeat(a, 3, -1), GRAYSCALE
  if min(a.shape[:2]) <= MIN_SIDE:
    status = TOO_SMALL
  return np.ascontiguousarray(a), status


def tf_decode_bytes(data, decoder: int):
  """Eager/graph decode with a fixed decoder (the ops the pipeline runs)."""
  if decoder == DECODER_PIL:
    return tf.numpy_function(pil_decode, [data], tf.uint8, stateful=False)
  if decoder == DECODER_TF_JPEG:  # accurate IDCT, as PIL / libjpeg's default
    return tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE')
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def _tf_decode(data, decoder):
  """In-graph decode of encoded bytes -> uint8 [h, w, 3] (TF or PIL by ``decoder``)."""
  branches = [
    lambda d=d: tf.ensure_shape(tf_decode_bytes(data, d), [None, None, 3])
    for d in (DECODER_TF, DECODER_PIL, DECODER_TF_JPEG)
  ]
  return tf.ensure_shape(tf.switch_case(tf.cast(decoder, tf.int32), branches), [None, None, 3])


def _build_index(read_fn, n: int, threads: int, what: str) -> ImageIndex:
  """Probe images 0..n-1 in a thread pool (PIL and file reads release the GIL)."""
  out = np.zeros((n, 4), np.int64)

  def probe(i):
    try:
      data = read_fn(i)
    except Exception:  # noqa: BLE001  (unreadable file = corrupt)
      return 0, 0, CORRUPT, DECODER_PIL
    return probe_image(data)

  threads = max(1, threads or (os.cpu_count() or 1))
  if n > 20000:
    print(f'updetr_jax.data: indexing {n} images of {what} ({threads} threads)...', flush=True)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    for i, r in enumerate(pool.map(probe, range(n), chunksize=64)):
      out[i] = r
  return ImageIndex(out[:, 0], out[:, 1], out[:, 2], out[:, 3])


def cached_npz(cache_dir, prefix: str, key: str, build) -> dict:
  """The arrays {name: array} of ``build()``, saved once under ``cache_dir`` as
  ``<prefix>-<hash of key>.npz`` and read from there later (no ``cache_dir``: no cache)."""
  if not cache_dir:
    return build()
  cache_dir = os.path.expanduser(cache_dir)
  path = os.path.join(cache_dir, f'{prefix}-{hashlib.sha1(key.encode()).hexdigest()[:20]}.npz')
  if files.exists(path):
    return files.read_npz(path)
  out = build()
  files.makedirs(cache_dir)
  files.write_npz(path, out)
  return out


class Source:
  """Random-access image source.

  num_images: int; index: ImageIndex; name: str.
  tf_load(image_id int64 [], path string []) -> uint8 [h, w, 3] (in graph; by default
  ``read_bytes`` decoded);
  read_bytes(i) -> encoded bytes (None for in-memory sources);
  paths: list[str] per image or None (then rows carry '' as path).
  """

  name = 'source'
  paths = None

  def tf_load(self, image_id, path, decoder):
    data = tf.numpy_function(self.read_bytes, [image_id], tf.string, stateful=False)
    return _tf_decode(tf.ensure_shape(data, []), decoder)

  def read_bytes(self, i):
    return None

  def _probe_index(self, cache_dir, key: str, threads: int) -> ImageIndex:
    """The index probed from ``read_bytes`` (saved once under ``cache_dir``, by ``key``)."""
    build = lambda: vars(_build_index(self.read_bytes, self.num_images, threads, self.name))  # noqa: E731
    return ImageIndex(**cached_npz(cache_dir, 'index', f'v{_INDEX_VERSION}\n{key}', build))

  def python_load(self, i) -> np.ndarray:
    """Decode image i on the host, raising on failure (used to find bad rows)."""
    data = self.read_bytes(i)
    if self.index.decoder[i] == DECODER_PIL:
      return pil_decode(data)
    return tf_decode_bytes(tf.constant(data), int(self.index.decoder[i])).numpy()


class MemorySource(Source):
  """Images already decoded in memory: list of uint8 arrays [h, w, 3] (or gray)."""

  def __init__(self, arrays, name='memory'):
    self.name = name
    conv = [to_rgb_array(a) for a in arrays]
    self.arrays = [a for a, _ in conv]
    status = [s for _, s in conv]
    self.num_images = len(self.arrays)
    self.index = ImageIndex(
      [a.shape[0] for a in self.arrays],
      [a.shape[1] for a in self.arrays],
      status,
      [DECODER_TF] * self.num_images,
    )

  def python_load(self, i):
    return self.arrays[int(i)]

  def tf_load(self, image_id, path, decoder):
    image = tf.numpy_function(self.python_load, [image_id], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [None, None, 3])


def list_image_files(folder: str) -> list[str]:
  """All image files under ``folder`` (recursive, case-insensitive extensions),
  sorted by their relative POSIX path."""
  rel = []
  for root, _, names in tf.io.gfile.walk(folder):
    for f in names:
      if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
        full = os.path.join(root, f)
        rel.append(os.path.relpath(full, folder).replace(os.sep, '/'))
  rel.sort()
  return [os.path.join(folder, r) for r in rel]


def _read_file(path: str) -> bytes:
  if '://' in path:
    with tf.io.gfile.GFile(path, 'rb') as f:
      return f.read()
  with open(path, 'rb') as f:
    return f.read()


class FileListSource(Source):
  """An explicit list of image files (missing / unreadable files index as corrupt)."""

  def __init__(
    self, paths, name: str, *, index_cache_dir=None, index_threads=0, cache_key: str = ''
  ):
    self.name = name
    self.paths = list(paths)
    self.num_images = len(self.paths)
    key = (
      cache_key + '\n' + '\n'.join(os.path.abspath(p) if '://' not in p else p for p in self.paths)
    )
    self.index = self._probe_index(index_cache_dir, key, index_threads)

  def read_bytes(self, i):
    return _read_file(self.paths[int(i)])

  def tf_load(self, image_id, path, decoder):
    return _tf_decode(tf.io.read_file(path), decoder)


class FolderSource(FileListSource):
  """A directory tree of images (see module docstring)."""

  def __init__(self, folder: str, *, index_cache_dir=None, index_threads=0):
    if not tf.io.gfile.isdir(folder):
      raise FileNotFoundError(f'data.folder={folder!r} is not a directory')
    paths = list_image_files(folder)
    if not paths:
      raise ValueError(f'data.folder={folder!r} contains no {IMAGE_EXTENSIONS} files')
    super().__init__(
      paths,
      f'folder:{folder}',
      index_cache_dir=index_cache_dir,
      index_threads=index_threads,
      cache_key='folder\n' + os.path.abspath(folder),
    )


class TFRecordIndex:
  """Random access to records of TFRecord files by scanning their length headers.

  shards: list of (filename, skip, take). Record i of the concatenation is read
  with one seek; CRCs are not checked (the image decoder validates the payload).
  """

  def __init__(self, shards):
    self.files, offsets, lengths, shard_of = [], [], [], []
    for s, (filename, skip, take) in enumerate(shards):
      offs, lens = self._scan(filename)
      stop = len(offs) if take is None or take < 0 else skip + take
      offsets.append(offs[skip:stop])
      lengths.append(lens[skip:stop])
      shard_of.append(np.full(len(offsets[-1]), s, np.int32))
      self.files.append(filename)
    self.offsets = np.concatenate(offsets) if offsets else np.zeros(0, np.int64)
    self.lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    self.shard = np.concatenate(shard_of) if shard_of else np.zeros(0, np.int32)
    self._local = threading.local()

  def __len__(self):
    return len(self.offsets)

  @staticmethod
  def _scan(filename):
    offs, lens = [], []
    with tf.io.gfile.GFile(filename, 'rb') as f:
      pos = 0
      while True:
        head = f.read(12)
        if len(head) < 12:
          break
        (length,) = struct.unpack('<Q', head[:8])
        offs.append(pos + 12)
        lens.append(length)
        pos += 12 + length + 4
        f.seek(pos)
    return np.asarray(offs, np.int64), np.asarray(lens, np.int64)

  def read(self, i: int) -> bytes:
    handles = getattr(self._local, 'handles', None)
    if handles is None:
      handles = self._local.handles = {}
    s = int(self.shard[i])
    f = handles.get(s)
    if f is None:
      f = handles[s] = tf.io.gfile.GFile(self.files[s], 'rb')
    f.seek(int(self.offsets[i]))
    return f.read(int(self.lengths[i]))


class TFDSSource(Source):
  """A TFDS image dataset (labels ignored); see module docstring."""

  def __init__(
    self, name, split, *, data_dir=None, image_key='image', index_cache_dir=None, index_threads=0
  ):
    import tensorflow_datasets as tfds  # noqa: PLC0415  (heavy, only when used)

    self.name = f'tfds:{name}/{split}'
    self.image_key = image_key
    data_dir = data_dir or os.environ.get('TFDS_DATA_DIR')
    self.builder = builder = tfds.builder(name, data_dir=data_dir)
    self._records = None
    self._source = None
    try:
      self._source = builder.as_data_source(
        split=split, decoders={image_key: tfds.decode.SkipDecoding()}
      )
      self.num_images = len(self._source)
    except (NotImplementedError, ValueError):
      instr = builder.info.splits[split].file_instructions
      self._records = TFRecordIndex([(fi.filename, fi.skip, fi.take) for fi in instr])
      self.num_images = len(self._records)
    key = '\n'.join(
      map(str, ('tfds', name, split, builder.data_dir, builder.info.version, self.num_images))
    )
    self.index = self._probe_index(index_cache_dir, key, index_threads)

  def read_bytes(self, i):
    i = int(i)
    if self._source is not None:
      return self._source[i][self.image_key]
    example = tf.train.Example.FromString(self._records.read(i))
    return example.features.feature[self.image_key].bytes_list.value[0]

  def read_example(self, i) -> dict:
    """All features of record i as numpy (the image left encoded), same order as
    ``read_bytes`` (used for annotations)."""
    i = int(i)
    if self._source is not None:
      return self._source[i]
    import tensorflow_datasets as tfds  # noqa: PLC0415

    return self.builder.info.features.deserialize_example_np(
      self._records.read(i), decoders={self.image_key: tfds.decode.SkipDecoding()}
    )


class ConcatSource(Source):
  """Several random-access sources one after the other (e.g. VOC07 + VOC12)."""

  def __init__(self, parts):
    self.parts = list(parts)
    self.name = ' + '.join(p.name for p in self.parts)
    sizes = [p.num_images for p in self.parts]
    self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    self.num_images = int(self.starts[-1])
    cat = lambda f: np.concatenate([getattr(p.index, f) for p in self.parts])  # noqa: E731
    self.index = ImageIndex(cat('height'), cat('width'), cat('status'), cat('decoder'))

  def locate(self, i):
    """Global image i -> (part, local index)."""
    k = int(np.searchsorted(self.starts, int(i), side='right')) - 1
    return self.parts[k], int(i) - int(self.starts[k])

  def read_bytes(self, i):
    part, j = self.locate(i)
    return part.read_bytes(j)


DEMO_MAX_SIDE = 640  # larger demo photos are shrunk once (keeps the demo fast)


def demo_arrays(names=DEMO_IMAGES) -> list[tuple[str, np.ndarray]]:
  """The demo photographs from scikit-image (offline): list of (name, array)."""
  import skimage.data  # noqa: PLC0415

  out = []
  for n in names:
    a = getattr(skimage.data, n)()
    h, w = a.shape[:2]
    if max(h, w) > DEMO_MAX_SIDE:
      f = DEMO_MAX_SIDE / max(h, w)
      im = Image.fromarray(a).resize((round(w * f), round(h * f)), Image.BILINEAR)
      a = np.asarray(im)
    out.append((n, a))
  return out


class MosaicSource(MemorySource):
  """The learnability benchmark's random mosaics (``data/mosaics.py``), rendered in
  memory: ``count`` images of ``split`` ('train' or 'eval'), ``style`` and ``cells``."""

  def __init__(
    self, split: str, count: int, seed: int, image_size, style: str = 'cells', cells=(6, 10)
  ):
    from updetr_jax.data import mosaics  # noqa: PLC0415

    arrays = mosaics.mosaic_arrays(
      split, count, seed=seed, image_size=tuple(image_size), style=style, cells=tuple(cells)
    )
    super().__init__(arrays, name=f'mosaics ({style}, {split})')


class DemoSource(MemorySource):
  """Real photographs bundled with scikit-image (gray ones converted to RGB)."""

  def __init__(self, names=DEMO_IMAGES):
    pairs = demo_arrays(names)
    super().__init__([a for _, a in pairs], name='demo')
    self.image_names = [n for n, _ in pairs]


def cache_decoded(source: Source, threads: int = 0) -> MemorySource:
  """Decode every usable image of ``source`` once into memory (small datasets only)."""
  usable = source.index.usable

  def load(i):
    if not usable[i]:
      return np.zeros((1, 1, 3), np.uint8)
    return pil_decode(source.read_bytes(i))

  with concurrent.futures.ThreadPoolExecutor(max(1, threads or os.cpu_count() or 1)) as p:
    arrays = list(p.map(load, range(source.num_images)))
  mem = MemorySource(arrays, name=source.name + ' (decoded)')
  mem.index = source.index  # the probed sizes and statuses (skipped entries stay)
  return mem


def make_source(cfg) -> Source:
  """Build the source named by ``cfg['source']`` (a plain dict of data fields)."""
  kind = cfg['source']
  if kind == 'demo':
    src = DemoSource(tuple(cfg['demo_images']))
  elif kind == 'mosaics':
    src = MosaicSource(
      cfg['mosaic_split'],
      cfg['mosaic_count'],
      cfg['mosaic_seed'],
      cfg['mosaic_size'],
      cfg['mosaic_style'],
      cfg['mosaic_cells'],
    )
  elif kind == 'folder':
    if not cfg['folder']:
      raise ValueError("data.source='folder' needs data.folder")
    src = FolderSource(
      cfg['folder'], index_cache_dir=cfg['index_cache_dir'], index_threads=cfg['index_threads']
    )
  elif kind == 'tfds':
    src = TFDSSource(
      cfg['tfds_name'],
      cfg['tfds_split'],
      data_dir=cfg['tfds_data_dir'] or None,
      image_key=cfg['tfds_image_key'],
      index_cache_dir=cfg['index_cache_dir'],
      index_threads=cfg['index_threads'],
    )
  else:
    raise ValueError(f"data.source={kind!r}: choose 'tfds', 'folder', 'demo' or 'mosaics'")
  if cfg['cache_decoded'] and not isinstance(src, MemorySource):
    src = cache_decoded(src, cfg['index_threads'])
  return src
