"""File formats gemmakit reads and writes: Hugging Face folders (`safetensors`, `hf_folder`),
GGUF (`gguf` reads and holds the one HF <-> GGUF rename table, `gguf_writer` writes),
llama.cpp's importance matrices (`imatrix`), and the tokenizer (`tokenizer`, from
`tokenizer.model`, `tokenizer.json` or a GGUF vocabulary)."""
