"""Old import path, kept so that existing code keeps working. Despite its name this module never held
NeMo's format: what it called a `.nemo` archive is the project's own **sdsearch training archive**
(`formats.save_sdsearch_archive` / `load_sdsearch_archive`). NeMo's real formats are in `nemo_format`;
`sdsearch convert` is `convert.convert`. New code imports from those modules."""

from nemo_sdsearch.checkpoint.convert import convert, detect_format, read_any  # noqa: F401
from nemo_sdsearch.checkpoint.formats import (CONFIG_FILE, EXTRA_FILES, FORMAT, MODEL_PREFIX,  # noqa: F401
                                              TOKENIZER_DIR, TOKENIZER_FILES, WEIGHTS_DIR, copy_tokenizer,
                                              extract_archive_tokenizer, hf_config_from_dict, is_sdsearch_archive,
                                              load_megatron_dir, load_sdsearch_archive, load_training_state, rank_file,
                                              read_hf_dir, save_megatron_dir, save_sdsearch_archive,
                                              save_training_state, training_state_to_megatron, write_hf_dir)

# the old names of the sdsearch training archive functions
save_nemo = save_sdsearch_archive
load_nemo = load_sdsearch_archive
extract_nemo_tokenizer = extract_archive_tokenizer
