"""Operations on a repository beyond save and load: delete and gc, verify, repair, step diff and usage."""
